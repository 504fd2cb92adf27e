"""Shared fixtures. Real servers (influxd, victoria-metrics) live in `servers.py`."""
