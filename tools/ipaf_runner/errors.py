"""Errors the runner reports to its user, and its one way of printing."""
from __future__ import annotations


class RunnerError(Exception):
    """An error to report to the user without a traceback; `code` is the exit status."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


class WorkflowError(RunnerError):
    """The workflow file cannot be read or converted."""


class UsageError(RunnerError):
    """A mistake in the runner's own arguments (--set, --image ...), found before any work is done."""


class PromptRejected(RunnerError):
    """The host refused the prompt (validation failed); nothing ran."""

    def __init__(self, message: str, payload: dict | None = None):
        super().__init__(message, code=2)
        self.payload = payload or {}


class PromptFailed(RunnerError):
    """A node raised while the prompt ran; the message is the node's own, without the host's traceback."""

    def __init__(self, message: str, error: dict | None = None):
        super().__init__(message, code=3)
        self.error = error or {}


def log(msg: str = "") -> None:
    print(msg, flush=True)
