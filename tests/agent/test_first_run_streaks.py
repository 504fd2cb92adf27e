"""`idle-streaks.json` is owner-only, like the spool files beside it."""

from __future__ import annotations

import os
import stat

from capmon.agent.streaks import StreakFile


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_idle_streaks_are_written_0600_and_stay_so_across_saves(tmp_path):
    old = os.umask(0o022)  # the usual umask, under which a plain write is 0644
    try:
        streaks = StreakFile(tmp_path / "idle-streaks.json", 600, clock=lambda: 1_000.0)
        (tmp_path / "idle-streaks.tmp").write_text("left by an older agent")
        os.chmod(tmp_path / "idle-streaks.tmp", 0o644)
        streaks.save({"GPU-0": ("free", 900.0)})
        assert mode(streaks.path) == 0o600
        streaks.save({"GPU-0": ("free", 800.0)})
        assert mode(streaks.path) == 0o600
        assert streaks.load() == {"GPU-0": ("free", 800.0)}
    finally:
        os.umask(old)
