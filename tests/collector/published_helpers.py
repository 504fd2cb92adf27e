"""What the published-view tests share: a database of its own per test, a writer into it, and the
fleet a storage-view process would answer from it."""

from __future__ import annotations

import dataclasses
import itertools
import re
from typing import Any

import pytest
from collector_helpers import Clock, make_config

from capmon.collector.config import PricingConfig, StorageConfig
from capmon.collector.liveview import StorageLiveView
from capmon.collector.published import PublishedFleet
from capmon.collector.storage import InfluxV1Writer

_databases = itertools.count()


@pytest.fixture
def db(influxd, request) -> str:
    """A database of its own for each test."""
    module = re.sub(r"\W", "_", request.module.__name__.rsplit(".", 1)[-1])
    name = f"capmon_{module}_{next(_databases)}"
    influxd.query(f'DROP DATABASE "{name}"', method="POST")
    influxd.create_database(name)
    return name


def storage_config(influxd, db: str) -> StorageConfig:
    return StorageConfig(kind="influxdb_v1", url=influxd.url, db=db, flush_interval_s=0.0)


@pytest.fixture
async def writer(influxd, db):
    w = InfluxV1Writer(storage_config(influxd, db))
    await w.start()
    yield w
    await w.close()


async def read_published(
    influxd, db: str, clock: Clock, pricing: PricingConfig, since_s: float = 86400.0, **collector: Any
) -> PublishedFleet:
    """What a storage-view process answers from: every process's published view, the range totals."""
    config = make_config(storage_config(influxd, db), live_view="storage", live_view_cache_s=0.0, **collector)
    config = dataclasses.replace(config, pricing=pricing)
    view = StorageLiveView(config, clock)
    await view.start()
    try:
        return await view.published(since_s)
    finally:
        await view.close()
