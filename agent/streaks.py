"""`idle-streaks.json` beside the spool: idle streaks and learned memory baselines across restarts."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path

log = logging.getLogger("capmon.agent")


class StreakFile:
    """Idle streaks and memory baselines kept across agent restarts (a JSON file beside the spool).

    Without it an agent upgrade would turn "idle for three weeks" into "idle for two minutes"
    fleet-wide. What it holds is trusted only if it was saved recently: an agent that was down for
    long cannot know what its devices did meanwhile.
    """

    def __init__(self, path: Path, max_age_s: float, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.max_age_s = max_age_s
        self.clock = clock

    def load(self) -> dict[str, tuple[object, ...]]:
        """Each device's saved record as it was written (`IdleClassifier.remember()`); the classifier
        checks the values and takes older, shorter records too."""
        try:
            data = json.loads(self.path.read_text())
            age = self.clock() - float(data["saved_at"])
            devices = {str(k): tuple(v) for k, v in data["devices"].items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
            log.warning("ignoring %s: %s", self.path, exc)
            return {}
        if not 0 <= age <= self.max_age_s:
            log.info("idle streaks in %s are %.0fs old: starting them afresh", self.path, age)
            return {}
        return devices

    def save(self, devices: Mapping[str, tuple[object, ...]]) -> None:
        """Atomically (a temporary file renamed over it), and owner-only (0600) like the spool files
        beside it."""
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o600)  # a .tmp left by an older agent keeps its mode otherwise
            f.write(json.dumps({"saved_at": self.clock(), "devices": devices}))
        os.replace(tmp, self.path)
