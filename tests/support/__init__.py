"""Helpers shared by every test suite (and, through `flow_api.testing`, the benchmarks):
one HTTP client, real servers and processes, the settings tests run with."""

from tests.support.client import TERMINAL, Api, JobClient
from tests.support.servers import WorkerFactory, serving, start_api
from tests.support.settings import PROVIDER_KEY, SIM_MODEL, cloud_settings, make_settings, openai_on

__all__ = [
    "PROVIDER_KEY",
    "SIM_MODEL",
    "TERMINAL",
    "Api",
    "JobClient",
    "WorkerFactory",
    "cloud_settings",
    "make_settings",
    "openai_on",
    "serving",
    "start_api",
]
