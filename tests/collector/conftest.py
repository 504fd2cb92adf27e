"""Fixtures of the collector tests: the published-view tests' database and writer (published_helpers)."""

from published_helpers import db, writer  # noqa: F401 - fixtures
