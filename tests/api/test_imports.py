"""The API process loads none of the worker's modules: it cannot take jobs by accident, and it
does not pay for them in memory or start-up time."""

from __future__ import annotations

import subprocess
import sys

WORKER_ONLY = (
    "flow_api.worker",
    "flow_api.queue.consumer",
    "flow_api.queue.slot_worker",
    "flow_api.queue.delivery_worker",
    "flow_api.webhooks.runner",
    "flow_api.webhooks.delivery",
    "flow_api.budget",
    "flow_api.pipeline",
)

_PROBE = """
import sys
from flow_api.api.app import create_app
from flow_api.settings import Settings
import flow_api.service  # what `flow-api api` imports to serve
create_app(Settings())
print("\\n".join(sorted(m for m in sys.modules if m.startswith("flow_api"))))
"""


def test_the_api_process_does_not_import_worker_modules() -> None:
    loaded = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True, timeout=120
    ).stdout.split()
    assert "flow_api.api.app" in loaded and "flow_api.queue.producer" in loaded  # it did run
    leaked = [m for m in loaded if m.startswith(WORKER_ONLY)]
    assert leaked == [], f"the API imported worker modules: {leaked}"
