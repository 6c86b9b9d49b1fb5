"""Typed errors raised by lab's core.

The core never prints or exits: it raises one of these, and the CLI
(`lab.cli`) is the single place that turns them into a message and an exit
code. Each error carries what failed and, where there is one, what to do next.
"""

from __future__ import annotations


class LabError(Exception):
    """Base of every error a user can cause or fix. Never shown with a traceback."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:  # pragma: no cover - trivial
        return self.message if not self.hint else f"{self.message}\n  fix: {self.hint}"


class SpecError(LabError):
    """lab.yaml (or a flag / LAB_* variable overriding it) is invalid."""

    exit_code = 2


class UsageError(LabError):
    """A command was called with arguments that cannot work (unknown node, ...)."""

    exit_code = 2


class PrerequisiteError(LabError):
    """Something the host needs is missing: a binary, root, a free subnet, an image."""

    exit_code = 3


class ProviderError(LabError):
    """A provider failed to create, start or stop nodes."""

    exit_code = 4


class StateError(LabError):
    """The lab's state on disk is missing, locked or does not fit the request."""

    exit_code = 5


class BoxError(LabError):
    """Building, finding or removing a node OS image failed."""

    exit_code = 6


class CommandError(LabError):
    """A command (local or on a node) exited non-zero.

    The message carries the command, where it ran, the exit code and the tail
    of its output, as invoke/Fabric do, so the failure can be read without
    re-running anything.
    """

    exit_code = 7

    def __init__(self, command: str, *, where: str, exit_status: int | None,
                 output: str = "", hint: str | None = None) -> None:
        tail = "\n".join(output.rstrip().splitlines()[-15:])
        status = "timed out" if exit_status is None else f"exited {exit_status}"
        message = f"{where}: `{command}` {status}"
        if tail:
            message += "\n" + "\n".join("    " + line for line in tail.splitlines())
        super().__init__(message, hint=hint)
        self.command = command
        self.where = where
        self.exit_status = exit_status
        self.output = output
