"""Fixtures for the provider paths: settings with every cloud provider on the simulator."""

from __future__ import annotations

import pytest

from flow_api.embedded import EmbeddedValkey
from flow_api.settings import Settings
from flow_api.testing import Simulator
from tests.support import cloud_settings


@pytest.fixture
def settings(valkey: EmbeddedValkey, simulator: Simulator) -> Settings:
    return cloud_settings(valkey.url, simulator.url)
