"""Fixtures for the end-to-end fault tests: every child process is killed (by process group) at teardown."""

from __future__ import annotations

import re

import pytest
from fault_procs import ProcessSet


@pytest.fixture
def procs():
    children = ProcessSet()
    try:
        yield children
    finally:
        children.kill_all()


@pytest.fixture
def db(request, influxd) -> str:
    """A database of its own for each test on the module's influxd (the collector creates it)."""
    name = "faults_" + re.sub(r"\W", "_", request.node.name)
    yield name
    if influxd.running:
        influxd.query(f'DROP DATABASE "{name}"', method="POST")
