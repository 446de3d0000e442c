"""A key with the `submit` scope but not `read` may cancel its tenant's jobs, and learns nothing
more from it than that the cancel won (issue 12, item 7): not the job's status, attempts,
timestamps or metadata, which only `read` may see."""

from __future__ import annotations

import pytest

from flow_api.settings import AuthSettings
from tests.security.conftest import KeyMaker


@pytest.mark.parametrize("auth_settings", [AuthSettings(enabled=True)], indirect=True)
async def test_a_submit_only_key_learns_only_that_its_cancel_won(caller: KeyMaker) -> None:
    writer = await caller("acme", scopes="submit")
    job_id = await writer.submit("no worker runs", metadata={"secret": "order 42"})
    answer = await writer.post(f"/api/ai/jobs/{job_id}/cancel")
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"jobId": job_id, "status": "cancelled"}
    again = await writer.delete(f"/api/ai/jobs/{job_id}")
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "job_already_finished"
    assert (await writer.get(f"/api/ai/status/{job_id}")).status_code == 403
    # A key that may read as well gets the whole view.
    admin = await caller("acme", scopes="admin")
    view = await admin.post(f"/api/ai/jobs/{await writer.submit('another')}/cancel")
    assert view.json()["status"] == "cancelled"
    assert "createdAt" in view.json()
