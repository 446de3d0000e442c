"""Test support: an OpenAI- and Anthropic-compatible provider simulator (see `simulator.py`).

Names are imported lazily so `python -m flow_api.testing.simulator` does not import the module
twice (runpy warns when a package pre-imports the module it is asked to run).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flow_api.testing.process import SimulatorProcess
    from flow_api.testing.simulator import Simulator, SimulatorConfig, SimulatorStats

__all__ = ["Simulator", "SimulatorConfig", "SimulatorProcess", "SimulatorStats"]

_HOMES = {
    "Simulator": "flow_api.testing.simulator",
    "SimulatorConfig": "flow_api.testing.simulator",
    "SimulatorStats": "flow_api.testing.simulator",
    "SimulatorProcess": "flow_api.testing.process",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
