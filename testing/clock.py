"""A clock a test controls: wall time that moves only when the test says, for every part that takes a clock."""

from __future__ import annotations

import math
from collections.abc import Callable

# 2025-10-09T08:54:00Z, a whole minute: windows of any length that divides 60 s start on it.
START = 1_760_000_040.0


class CapmonClock:
    """Unix seconds that move only by `advance()` or `set()`.

    Pass it wherever capmon takes a wall clock (`Sampler`, `IdleClassifier` callers, `Spool.open`,
    `Transport`, `Agent`, `create_app`, `MockProbe`): it is a `Callable[[], float]`. `monotonic()`
    never goes back, even when `set()` steps the wall clock back (an NTP step); `sleep()` is a
    sleep that advances the clock instead of waiting, for the parts that also take a sleep.
    """

    def __init__(self, start: float = START) -> None:
        self._check(start)
        self.now = float(start)
        self._mono = 0.0
        self._followers: list[Callable[[float], object]] = []

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        """Let `seconds` pass; returns the new time."""
        if not (isinstance(seconds, (int, float)) and math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"advance(seconds): a finite number ≥ 0, got {seconds!r}")
        self.now += seconds
        self._mono += seconds
        for follow in self._followers:
            follow(seconds)
        return self.now

    def on_advance(self, follow: Callable[[float], object]) -> None:
        """Call `follow(seconds)` whenever time passes, so a fake boundary keeps the test's time
        (`capmon_clock.on_advance(fake_nvml.advance)`)."""
        self._followers.append(follow)

    def set(self, t: float) -> float:
        """Step the wall clock to `t` (forward or back); the monotonic clock moves forward only."""
        self._check(t)
        if t > self.now:
            return self.advance(t - self.now)
        self.now = float(t)
        return self.now

    def monotonic(self) -> float:
        return self._mono

    def sleep(self, seconds: float) -> None:
        self.advance(max(0.0, seconds))

    async def async_sleep(self, seconds: float) -> None:
        self.advance(max(0.0, seconds))

    @staticmethod
    def _check(t: object) -> None:
        if not (isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) and t >= 0):
            raise ValueError(f"a clock time is unix seconds (a finite number ≥ 0), got {t!r}")

    def __repr__(self) -> str:
        return f"CapmonClock({self.now!r})"
