"""Shared fixtures. Real servers (influxd, victoria-metrics) live in `servers.py`."""

from servers import *  # noqa: F403 - the influxd / victoria_metrics fixtures
