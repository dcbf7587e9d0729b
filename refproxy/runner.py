"""Bounded-frequency scheduling of rule syncs (kube-proxy's BoundedFrequencyRunner).

Contract: :class:`SyncSchedule` is pure (takes clock readings, returns delays)
so its guarantees are tested without sleeping; :class:`BoundedFrequencyRunner`
is the thin threaded loop around it. Mirrors
``k8s.io/kubernetes/pkg/util/async/bounded_frequency_runner.go``.

Guarantees:

1. The function runs at most once per ``min_interval`` (syncs coalesce).
2. A requested run happens no later than ``min_interval`` after the previous
   run ended, or immediately when that has already passed. Intervals count
   from the *end* of a run, so whatever the function does inline delays the
   next run: a cleanup plugin with ``runs_in_sync`` (kube-proxy's
   reconciler inside ``syncProxyRules``) holds back the next rule sync by
   its own duration, as upstream's does.
3. Without requests the function still runs every ``max_interval``.
4. The function never runs concurrently with itself.
5. ``stop()`` returns once the loop has exited; a run in progress finishes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

__all__ = ["SyncSchedule", "BoundedFrequencyRunner"]


class SyncSchedule:
    """The pure scheduling state of a bounded-frequency runner."""

    __slots__ = ("min_interval", "max_interval", "last_run", "pending")

    def __init__(self, min_interval: float, max_interval: float) -> None:
        if min_interval < 0 or max_interval <= 0 or min_interval > max_interval:
            raise ValueError("need 0 <= min_interval <= max_interval and max_interval > 0")
        self.min_interval = min_interval
        self.max_interval = max_interval
        self.last_run: float | None = None
        self.pending = True  # the first run happens as soon as possible

    def request(self) -> None:
        """Ask for a run (coalesced with any other pending request)."""
        self.pending = True

    def delay(self, now: float) -> float:
        """Seconds until the next run is due (0 = run now)."""
        if self.last_run is None:
            return 0.0
        interval = self.min_interval if self.pending else self.max_interval
        return max(0.0, self.last_run + interval - now)

    def ran(self, now: float) -> None:
        """Record that a run ended at ``now``."""
        self.last_run = now
        self.pending = False


class BoundedFrequencyRunner:
    """Runs ``fn`` in a loop under a :class:`SyncSchedule` (see module doc)."""

    def __init__(
        self,
        fn: Callable[[], object],  # its result is ignored (Proxier.sync returns whether it applied)
        min_interval: float,
        max_interval: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        name: str = "sync",
    ) -> None:
        self._fn = fn
        self._schedule = SyncSchedule(min_interval, max_interval)
        self._clock = clock
        self._cond = threading.Condition()
        self._stopped = False
        self._thread: threading.Thread | None = None
        self.name = name
        self.runs = 0

    def run(self) -> None:
        """Request a run (like kube-proxy's ``Run()``); never blocks."""
        with self._cond:
            self._schedule.request()
            self._cond.notify()

    def start(self) -> None:
        self._thread = threading.Thread(target=self.loop, name=self.name, daemon=True)
        self._thread.start()

    def loop(self) -> None:
        """The loop body; returns after ``stop()``."""
        while True:
            with self._cond:
                while not self._stopped:
                    d = self._schedule.delay(self._clock())
                    if d <= 0:
                        break
                    self._cond.wait(timeout=d)
                if self._stopped:
                    return
                # Clear the request before running: a request arriving during
                # the run schedules another one.
                self._schedule.pending = False
            try:
                self._fn()
            finally:
                with self._cond:
                    self.runs += 1
                    pending = self._schedule.pending
                    self._schedule.ran(self._clock())
                    self._schedule.pending = pending

    def stop(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
