"""What the collector does with clients that misbehave at the HTTP level, against the real server on
a socket: a body that trickles (item 15), a client gone mid-body (item 13), a malformed request whose
header carries a token (item 14), refused tokens logged by name, never by value (item 23)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging

import pytest
from aiohttp import web
from collector_helpers import AGENT_TOKEN, READ_TOKEN, Clock, RecordingWriter, auth, batch, body, make_config
from servers import free_port

from capmon.collector.app import AUTH_LOG, INGEST, METRICS, create_app
from capmon.collector.auth import AuthFailureLog


class Served:
    """The app on a socket the way `web.run_app` serves it (no handler cancellation on disconnect;
    aiohttp's test server cancels handlers, which production does not)."""

    def __init__(self, app: web.Application, runner: web.AppRunner, port: int) -> None:
        self.app, self.runner, self.host, self.port = app, runner, "127.0.0.1", port


@pytest.fixture
async def serve():
    runners: list[web.AppRunner] = []

    async def start(**limits) -> Served:
        app = create_app(make_config(), writer=RecordingWriter(), clock=Clock())
        service = app[INGEST]
        service.limits = dataclasses.replace(service.limits, **limits)
        runner = web.AppRunner(app, handler_cancellation=False, access_log=None)
        await runner.setup()
        runners.append(runner)
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        return Served(app, runner, port)

    yield start
    for runner in runners:
        await runner.cleanup()


def request_head(length: int, token: str = AGENT_TOKEN) -> bytes:
    return (
        "POST /api/v1/reports HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {token}\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


async def test_a_trickling_body_is_cut_off_with_408(serve):
    server = await serve(body_read_timeout_s=0.3)
    reader, writer = await asyncio.open_connection(server.host, server.port)
    data = body(batch())
    writer.write(request_head(len(data)) + data[:10])
    await writer.drain()
    answer = await asyncio.wait_for(reader.readuntil(b"}"), 10)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"Connection: close" in answer and b"body_read_timeout_s" in answer
    assert server.app[METRICS].rejects.get(reason="body_timeout") == 1


async def test_a_client_gone_mid_body_is_counted_at_info_not_an_error(serve, caplog):
    server = await serve()
    metrics = server.app[METRICS]
    caplog.set_level(logging.DEBUG)
    for _ in range(3):
        _reader, writer = await asyncio.open_connection(server.host, server.port)
        writer.write(request_head(100_000) + b'{"protocol": 1, ')
        await writer.drain()
        await asyncio.sleep(0.05)  # let the handler start reading the body
        writer.transport.abort()
    for _ in range(200):
        if metrics.rejects.get(reason="client_disconnected") == 3:
            break
        await asyncio.sleep(0.01)
    assert metrics.rejects.get(reason="client_disconnected") == 3
    assert metrics.requests.get(route="/api/v1/reports", status="500") == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert "disconnected" in caplog.text


async def test_a_malformed_header_never_logs_its_value(serve, caplog):
    server = await serve()
    caplog.set_level(logging.DEBUG)
    secret = "agentA-tok-7f3c91"
    for raw in (
        f"GET /healthz HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {secret}\x01\r\n\r\n",
        f"GET /healthz HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {secret}\x00\r\n\r\n",
        f"GET /healthz HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {secret}{'A' * 9000}\r\n\r\n",
        f"GET /he\x01lthz?{secret} HTTP/1.1\r\nHost: x\r\n\r\n",
    ):
        reader, writer = await asyncio.open_connection(server.host, server.port)
        writer.write(raw.encode("latin-1"))
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert answer[:13] in (b"HTTP/1.0 400 ", b"HTTP/1.1 400 "), answer[:100]
    assert secret not in caplog.text
    problems = [r for r in caplog.records if r.name.startswith(("aiohttp", "capmon.collector.http"))]
    assert problems and all(r.exc_info is None and r.levelno <= logging.WARNING for r in problems)
    assert server.app[METRICS].malformed_requests.get() == 4


async def test_refused_tokens_are_logged_by_name_rate_limited(aiohttp_client, caplog):
    app = create_app(make_config(), writer=RecordingWriter(), clock=Clock())
    now = [0.0]
    app[AUTH_LOG] = AuthFailureLog(interval_s=60.0, clock=lambda: now[0])
    client = await aiohttp_client(app)
    caplog.set_level(logging.INFO, logger="capmon.collector.auth")
    for _ in range(5):
        resp = await client.post("/api/v1/reports", data=body(batch()), headers=auth("wrong-token-123"))
        assert resp.status == 401
    resp = await client.post("/api/v1/reports", data=body(batch()), headers=auth(READ_TOKEN))
    assert resp.status == 403
    lines = [r.getMessage() for r in caplog.records if r.name == "capmon.collector.auth"]
    assert len(lines) == 2, lines
    assert "unknown token" in lines[0] and "127.0.0.1" in lines[0]
    assert "'grafana'" in lines[1]
    now[0] += 61
    await client.post("/api/v1/reports", data=body(batch()), headers=auth("wrong-token-123"))
    lines = [r.getMessage() for r in caplog.records if r.name == "capmon.collector.auth"]
    assert "4 more since the last line" in lines[-1]
    assert "wrong-token-123" not in caplog.text and READ_TOKEN not in caplog.text


async def test_stopping_logs_a_line_and_storage_none_writes_no_lines(aiohttp_client, caplog):
    caplog.set_level(logging.INFO, logger="capmon.collector")
    client = await aiohttp_client(create_app(make_config(), clock=Clock()))  # storage kind "none"
    resp = await client.post(
        "/api/v1/reports",
        data=body(batch()),
        headers={"Content-Type": "application/json", **auth(AGENT_TOKEN)},
    )
    assert resp.status == 200
    assert client.server.app[METRICS].lines_written.get() == 0
    await client.close()
    assert "capmon collector stopped" in caplog.text
