"""Fixtures for the probe plugin tests. Fakes of hardware boundaries live in `tests/fakes/`."""

from __future__ import annotations

import sys
from pathlib import Path

# tests/ has no __init__.py files; make `tests/fakes` importable as the `fakes` package.
_TESTS = Path(__file__).resolve().parents[1]
if str(_TESTS) not in sys.path:
    sys.path.insert(0, str(_TESTS))
