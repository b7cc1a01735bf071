"""Bounded guest runs: one process-wide watchdog thread that kicks late vCPUs.

``KVM_RUN`` blocks in the kernel for as long as the guest runs (a CPL0 ``jmp .``
never exits to userspace), so a timeout needs another thread: at the deadline
it calls ``Vcpu.kick()``, which sets ``kvm_run.immediate_exit`` and signals the
vCPU thread so ``KVM_RUN`` returns ``EINTR`` (the selftests' and QEMU's
method).  One thread serves every Machine in the process; arming and
disarming a deadline costs a lock and a notify, not a thread start, so bounded
runs stay cheap.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time


class Watchdog:
    def __init__(self):
        self._cv = threading.Condition()
        self._heap: list = []  # (deadline, token, callback)
        self._live: set = set()
        self._tokens = itertools.count()
        self._thread: threading.Thread | None = None

    def arm(self, seconds: float, callback) -> int:
        """Call ``callback()`` from the watchdog thread after ``seconds`` unless disarmed."""
        token = next(self._tokens)
        with self._cv:
            heapq.heappush(self._heap, (time.monotonic() + seconds, token, callback))
            self._live.add(token)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="kvmharness-watchdog",
                                                daemon=True)
                self._thread.start()
            self._cv.notify()
        return token

    def disarm(self, token: int) -> None:
        with self._cv:
            self._live.discard(token)

    def _loop(self):
        with self._cv:
            while True:
                while self._heap and self._heap[0][1] not in self._live:
                    heapq.heappop(self._heap)  # disarmed
                if not self._heap:
                    self._cv.wait()
                    continue
                deadline, token, callback = self._heap[0]
                delay = deadline - time.monotonic()
                if delay > 0:
                    self._cv.wait(delay)
                    continue
                heapq.heappop(self._heap)
                if token in self._live:
                    self._live.discard(token)
                    try:
                        callback()
                    except Exception:  # a kick must never kill the watchdog
                        pass


WATCHDOG = Watchdog()
