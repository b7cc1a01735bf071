"""Errors of the remote layer: one rig unreachable or unusable.

Kept apart from ``ssh`` so that code and tests which only handle the results
(``rig``, the inventory tests) import without paramiko, e.g. on a rig.
"""

from __future__ import annotations

from ..errors import EXIT_HOST, EXIT_TIMEOUT, HostError


class RigError(HostError):
    """A rig could not be reached or used; ``reason`` says why."""

    exit_code = EXIT_HOST

    def __init__(self, rig: str, reason: str):
        self.rig = rig
        self.reason = reason
        super().__init__(f"rig {rig}: {reason}")


class RigTimeout(RigError):
    """A remote command outlived its time budget; it was killed."""

    exit_code = EXIT_TIMEOUT


class RigCancelled(RigError):
    """The user interrupted (Ctrl-C); the remote command was killed."""

    exit_code = 130
