"""Why a command refused to start: one line for the operator, and the exit code.

The CLI prints `flow-api: <message>` and exits with `exit_code`, without a traceback: these are
conditions of the machine or the configuration, not bugs. 2 = the configuration (fix a
setting), 1 = the machine (a port taken, a folder in use or not writable).
"""

from __future__ import annotations


class StartupError(RuntimeError):
    """A condition that stops a command from starting; the message says what to do."""

    exit_code = 1


class ConfigurationError(StartupError):
    """The settings cannot work as given."""

    exit_code = 2
