"""Bounded guest runs: one process-wide watchdog thread that kicks late vCPUs.

``KVM_RUN`` blocks in the kernel for as long as the guest runs (a CPL0 ``jmp .``
never exits to userspace), so a timeout needs another thread: at the deadline
it calls ``Vcpu.kick()``, which sets ``kvm_run.immediate_exit`` and signals the
vCPU thread so ``KVM_RUN`` returns ``EINTR`` (the selftests' and QEMU's
method).  One thread serves every Machine in the process; arming and
disarming a deadline costs a lock and a notify, not a thread start, so bounded
runs stay cheap.

Every run is bounded, so a timeout is a finite number of seconds greater than 0
and at most :data:`MAX_TIMEOUT` (one day); :func:`check_timeout` is the one place
that says so, used by the CLI (``--timeout``), ``run_guest``, ``Machine.run`` and
:meth:`Watchdog.arm` itself.  ``inf`` is refused like ``nan``, 0 and negatives:
there is no "no timeout" (a guest that must run longer than a day is a bug in
the guest or its manifest, and an unbounded ``jmp .`` on kvm would block its
thread in ``KVM_RUN`` for ever).

Because one thread serves every Machine, its death would silently disable every
later timeout in the process, so the loop survives anything: waits are clamped
to :data:`_MAX_WAIT` (``Condition.wait`` raises ``OverflowError`` past the
platform's ``time_t``), each pass is guarded (a failure is recorded in
:attr:`Watchdog.errors` and logged; a deadline that is due or unreadable is fired
rather than retried for ever), and ``arm`` restarts the thread if it has died all
the same.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import numbers
import signal
import threading
import time

from .errors import UsageError

MAX_TIMEOUT = 86_400.0  # seconds: the longest timeout accepted anywhere (one day)
_MAX_WAIT = 60.0  # the longest single Condition.wait; the loop re-checks the heap after it
_ERRORS_KEPT = 20

log = logging.getLogger(__name__)


def check_timeout(value, what: str = "timeout") -> float:
    """``value`` as float seconds if it is a usable timeout, else :class:`UsageError`.

    Usable: a real number (not a bool), finite, > 0 and <= :data:`MAX_TIMEOUT`.
    ``what`` names it in the one-line message (``--timeout``, ``guest 'x' timeout``).
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise UsageError(f"{what} must be a number of seconds, not {value!r}")
    seconds = float(value)
    if not math.isfinite(seconds) or not 0 < seconds <= MAX_TIMEOUT:
        raise UsageError(f"{what} must be a positive number of seconds, finite and at most "
                         f"{MAX_TIMEOUT:g} (one day), not {seconds:g}")
    return seconds


class Watchdog:
    def __init__(self):
        self._cv = threading.Condition()
        self._heap: list = []  # (deadline, token, callback)
        self._live: set = set()
        self._tokens = itertools.count()
        self._thread: threading.Thread | None = None
        self.errors: list[str] = []  # the last failures inside the watchdog thread, newest last
        self.restarts = 0  # times arm() found the thread dead and started a new one

    def arm(self, seconds: float, callback) -> int:
        """Call ``callback()`` from the watchdog thread after ``seconds`` unless disarmed.

        ``seconds`` must pass :func:`check_timeout` (raises :class:`UsageError`)."""
        seconds = check_timeout(seconds)
        token = next(self._tokens)
        with self._cv:
            heapq.heappush(self._heap, (time.monotonic() + seconds, token, callback))
            self._live.add(token)
            if self._thread is None or not self._thread.is_alive():
                if self._thread is not None:
                    self.restarts += 1
                    self._record("watchdog thread had died; restarted it")
                self._thread = threading.Thread(target=self._loop, name="kvmharness-watchdog",
                                                daemon=True)
                self._thread.start()
            self._cv.notify()
        return token

    def disarm(self, token: int) -> None:
        with self._cv:
            self._live.discard(token)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _record(self, message: str) -> None:
        self.errors.append(message)
        del self.errors[:-_ERRORS_KEPT]
        log.warning("kvmharness watchdog: %s", message)

    def _loop(self):
        with self._cv:
            while True:
                try:
                    self._step()
                except BaseException as e:  # noqa: BLE001 - nothing may end the one watchdog
                    self._record(f"{type(e).__name__}: {e}")
                    self._recover()

    def _recover(self):
        """After a failed pass: fire the earliest deadline if it is due or unreadable (rather
        than fail on it for ever: a timeout that fires early is seen, one that never fires
        hangs its thread in KVM_RUN); otherwise pause briefly and let the loop try again."""
        try:
            try:
                due = bool(self._heap) and not self._heap[0][0] - time.monotonic() > 0
            except Exception:  # noqa: BLE001 - an unreadable deadline counts as due
                due = True
            if due:
                _, token, callback = heapq.heappop(self._heap)
                if token in self._live:
                    self._live.discard(token)
                    callback()
            else:
                self._cv.release()
                try:
                    time.sleep(0.01)
                finally:
                    self._cv.acquire()
        except BaseException as e:  # noqa: BLE001
            self._record(f"recovering from a failure failed too: {type(e).__name__}: {e}")

    def _step(self):
        """One pass: drop disarmed deadlines, wait for the next one, or fire it (lock held)."""
        while self._heap and self._heap[0][1] not in self._live:
            heapq.heappop(self._heap)  # disarmed
        if not self._heap:
            self._cv.wait()
            return
        deadline, token, callback = self._heap[0]
        delay = deadline - time.monotonic()
        if delay > 0:
            self._cv.wait(min(delay, _MAX_WAIT))
            return
        heapq.heappop(self._heap)
        if token in self._live:
            self._live.discard(token)
            try:
                callback()
            except Exception as e:  # noqa: BLE001 - a failed kick must never kill the watchdog
                self._record(f"deadline callback failed: {type(e).__name__}: {e}")


WATCHDOG = Watchdog()


# -- the kick signal -------------------------------------------------------------
# A kvm vCPU is kicked out of KVM_RUN by a signal to its thread (kvm/vcpu.py).  A
# real-time signal, so it cannot collide with the SIGALRM/SIGINT/SIGUSR* handlers of
# pytest plugins.  It must have a handler: with the default action the signal would
# kill the process, and an ignored signal would not interrupt KVM_RUN.  Python
# installs handlers only from the main thread, so it is installed when this module
# is first imported there (importing kvmharness does it); a kvm backend that finds
# no handler refuses to open rather than be killed by its first timeout.
KICK_SIGNAL = signal.SIGRTMIN + 7
_kick_handler_installed = False


def _ignore_kick(signum: int, frame: object) -> None:
    pass


def ensure_kick_signal() -> bool:
    """Install the no-op handler for KICK_SIGNAL where possible; whether one is there."""
    global _kick_handler_installed
    if _kick_handler_installed:
        return True
    if threading.current_thread() is not threading.main_thread():
        return signal.getsignal(KICK_SIGNAL) not in (signal.SIG_DFL, signal.SIG_IGN, None)
    signal.signal(KICK_SIGNAL, _ignore_kick)
    _kick_handler_installed = True
    return True


if threading.current_thread() is threading.main_thread():
    ensure_kick_signal()
