"""The hardware-level exit trace: one record per simulated #VMEXIT.

A record says what the SVM hardware reported (exit code and name, EXITINFO1/2,
the guest RIP and nRIP) and what KVM did with it (``handled``: ``"kernel"`` when
KVM resumed the guest itself, else the userspace exit it produced).  The kvm
backend fills the same shape from the ``kvm_exit`` tracepoint, so a trace means
the same on both backends.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, overload

from ..abi import exit_name


@dataclass(slots=True)
class HwExit:
    seq: int
    exit_code: int
    exit_info_1: int
    exit_info_2: int
    rip: int
    next_rip: int
    handled: str = "kernel"

    @property
    def name(self) -> str:
        return exit_name(self.exit_code)

    def to_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "exit_code": self.exit_code, "name": self.name,
                "exit_info_1": self.exit_info_1, "exit_info_2": self.exit_info_2,
                "rip": self.rip, "next_rip": self.next_rip, "handled": self.handled}

    def __str__(self) -> str:
        return (f"#{self.seq} {self.name}({self.exit_code:#x}) info1={self.exit_info_1:#x} "
                f"info2={self.exit_info_2:#x} rip={self.rip:#x} -> {self.handled}")


class HwTrace:
    """The :class:`HwExit` records of one vCPU (a sequence), bounded to ``limit`` entries.

    Records are kept as tuples and turned into :class:`HwExit` when read: recording
    is on the path of every exit.
    """

    def __init__(self, limit: int = 100_000):
        self._rows: list[tuple[int, int, int, int, int, int, str]] = []
        self.limit = limit
        self.total = 0

    def record(self, code: int, info1: int, info2: int, rip: int, next_rip: int,
               handled: str = "kernel") -> None:
        self.total += 1
        rows = self._rows
        if len(rows) >= self.limit:
            del rows[: self.limit // 2]  # keep the recent half: the tail is what explains a failure
        rows.append((self.total, code, info1, info2, rip, next_rip, handled))

    def record_overflow(self) -> None:
        del self._rows[: self.limit // 2]  # keep the recent half: the tail explains a failure

    def __len__(self) -> int:
        return len(self._rows)

    @overload
    def __getitem__(self, i: int) -> HwExit: ...

    @overload
    def __getitem__(self, i: slice) -> list[HwExit]: ...

    def __getitem__(self, i: int | slice) -> HwExit | list[HwExit]:
        if isinstance(i, slice):
            return [HwExit(*r) for r in self._rows[i]]
        return HwExit(*self._rows[i])

    def __iter__(self) -> Iterator[HwExit]:
        return (HwExit(*r) for r in self._rows)

    def clear(self) -> None:
        self._rows.clear()

    def __repr__(self) -> str:
        return f"HwTrace({len(self._rows)} records, {self.total} total)"
