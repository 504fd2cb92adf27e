"""The influxdb_v1 writer on aiohttp 3.9, and behind a reverse proxy that mounts InfluxDB at a path prefix."""

from __future__ import annotations

import warnings
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from capmon.collector import storage
from capmon.collector.config import StorageConfig
from capmon.collector.storage import InfluxV1Writer


@pytest.mark.parametrize("prefix", ["/influx/", "/influx", "/a/b/influx/"])
async def test_v1_writer_keeps_the_urls_path_prefix(aiohttp_raw_server, prefix):
    seen: list[tuple[str, str, dict[str, str], str]] = []

    async def handler(request: web.BaseRequest) -> web.Response:
        seen.append(
            (request.method, request.path, dict(request.query), request.headers.get("Content-Encoding", ""))
        )
        return web.Response(status=204)

    server = await aiohttp_raw_server(handler)
    url = str(server.make_url(prefix))
    writer = InfluxV1Writer(StorageConfig(kind="influxdb_v1", url=url, db="fleet", create_database=True))
    await writer.start()
    try:
        await writer.ready()  # CREATE DATABASE, which the collector runs in the background
        await writer.write(["m v=1.0 1"])
    finally:
        await writer.close()
    base = prefix.rstrip("/")
    assert [(m, p) for m, p, _, _ in seen] == [("POST", f"{base}/query"), ("POST", f"{base}/write")]
    assert seen[1][2] == {"db": "fleet", "precision": "s"}
    assert seen[1][3] == "gzip"


with warnings.catch_warnings():  # aiohttp discourages subclassing ClientSession; a test double may
    warnings.simplefilter("ignore", DeprecationWarning)

    class Session39(aiohttp.ClientSession):
        """aiohttp 3.9's ClientSession rules (the floor in pyproject): a base_url may carry no path, and a
        relative request URL must start with "/". Newer aiohttp relaxed both."""

        def __init__(self, *args: Any, base_url: Any = None, **kwargs: Any) -> None:
            if base_url is not None:
                path = URL(base_url).path
                assert path in ("", "/"), "Only absolute URLs without path part are supported"
            super().__init__(*args, base_url=base_url, **kwargs)

        def _request(self, method: str, str_or_url: Any, **kwargs: Any) -> Any:
            url = URL(str_or_url)
            assert url.is_absolute() or url.path.startswith("/"), f"relative URL {url} on aiohttp 3.9"
            return super()._request(method, str_or_url, **kwargs)


@pytest.mark.parametrize("prefix", ["", "/influx/"])
async def test_v1_writer_works_with_aiohttp_3_9s_client_session(aiohttp_raw_server, monkeypatch, prefix):
    paths: list[str] = []

    async def handler(request: web.BaseRequest) -> web.Response:
        paths.append(request.path)
        return web.Response(status=204)

    server = await aiohttp_raw_server(handler)
    monkeypatch.setattr(storage.aiohttp, "ClientSession", Session39)
    url = str(server.make_url(prefix))
    writer = InfluxV1Writer(StorageConfig(kind="influxdb_v1", url=url, db="fleet", create_database=True))
    await writer.start()
    try:
        await writer.ready()  # CREATE DATABASE, which the collector runs in the background
        await writer.write(["m v=1.0 1"])
    finally:
        await writer.close()
    assert paths == [f"{prefix.rstrip('/')}/query", f"{prefix.rstrip('/')}/write"]
