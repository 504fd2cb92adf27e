"""The transport against a real aiohttp server scripted to answer like a collector in trouble."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import ssl
import subprocess
from collections.abc import Callable
from datetime import datetime, timezone
from email.utils import format_datetime

import pytest
from aiohttp import web

from capmon.agent import wire
from capmon.agent.spool import DEAD_LETTER_NAME, Spool, SpoolConfig
from capmon.agent.transport import Outcome, Transport, TransportConfig

TOKEN = "s3cret-agent-token"
IDENTITY = wire.AgentIdentity(id="node-1", host="node-1.example", instance="abc123", labels={"site": "ams1"})
NOW = 1_800_000_000.0

Reply = Callable[[wire.Batch], web.StreamResponse]


def ok(batch: wire.Batch) -> web.Response:
    return web.json_response({"accepted": len(batch.reports)})


def status(code: int, error: str = "error", path: str | None = None, **headers: str) -> Reply:
    def reply(batch: wire.Batch) -> web.Response:
        body = {"error": error, "detail": f"HTTP {code}"} | ({"path": path} if path else {})
        return web.json_response(body, status=code, headers=headers)

    return reply


class Collector:
    """Answers each POST with the next scripted reply (the last one repeats); records what it received."""

    def __init__(self, *script: Reply) -> None:
        self.script = list(script) or [ok]
        self.received: list[wire.Batch] = []  # every well-formed batch, whatever the answer
        self.delivered: list[int] = []  # seqs of batches answered 2xx
        self.requests: list[web.Request] = []
        self.got_request = asyncio.Event()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(request)
        self.got_request.set()
        # aiohttp's server inflates `Content-Encoding: gzip` bodies itself, as the collector relies on.
        batch = wire.decode_batch(await request.read())
        self.received.append(batch)
        reply = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        response = reply(batch)
        if 200 <= response.status < 300:
            self.delivered += [r.seq for r in batch.reports]
        return response


def drop(batch: wire.Batch) -> web.StreamResponse:
    raise ConnectionDropped


class ConnectionDropped(Exception):
    pass


@pytest.fixture
async def collector(aiohttp_server):
    async def start(*script: Reply) -> tuple[Collector, str]:
        c = Collector(*script)

        async def handler(request: web.Request) -> web.StreamResponse:
            try:
                return await c.handle(request)
            except ConnectionDropped:
                assert request.transport is not None
                request.transport.abort()  # the collector's host went away mid-request
                raise

        app = web.Application()
        app.router.add_post("/api/v1/reports", handler)
        server = await aiohttp_server(app)
        return c, str(server.make_url("/api/v1/reports"))

    return start


@pytest.fixture
def spool(tmp_path):
    s = Spool.open(SpoolConfig(path=str(tmp_path / "spool")), clock=lambda: NOW)
    yield s
    s.close()


def fill(spool: Spool, n: int) -> list[int]:
    seqs = []
    for _ in range(n):
        seq = spool.next_seq()
        end = 1_700_000_000 + 60 * seq
        spool.append(
            wire.Report(
                seq=seq,
                start=end - 60,
                end=end,
                devices=[wire.DeviceWindow(device_id="GPU-0", vendor="nvidia", state="free", free_s=60.0)],
            )
        )
        seqs.append(seq)
    return seqs


class Sleeps:
    """The injected sleep: records what the transport asked for, returns at once."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)
        if len(self.calls) > 50:
            raise AssertionError(f"retry loop: slept {self.calls}")


def make_transport(spool: Spool, url: str, sleeps: Sleeps | None = None, **config) -> Transport:
    config.setdefault("token", TOKEN)
    return Transport(
        TransportConfig(url=url, **config),
        spool,
        IDENTITY,
        sleep=sleeps or Sleeps(),
        clock=lambda: NOW,
        rng=lambda: 1.0,  # jitter at its top: the backoff ceiling itself
        environ={},
    )


async def run_until_empty(transport: Transport) -> None:
    transport.finish()
    await transport.run()


async def test_delivers_oldest_first_in_seq_order_and_empties_the_spool(spool, collector):
    c, url = await collector(ok)
    appended = fill(spool, 7)
    await run_until_empty(make_transport(spool, url, batch_reports=3))

    assert [[r.seq for r in b.reports] for b in c.received] == [[1, 2, 3], [4, 5, 6], [7]]
    assert c.delivered == appended
    assert spool.stats()["spool_reports"] == 0
    request = c.requests[0]
    assert request.headers["Authorization"] == f"Bearer {TOKEN}"
    assert request.headers["Content-Encoding"] == "gzip"
    assert c.received[0].agent == IDENTITY


async def test_nothing_leaves_the_spool_until_the_collector_answers_2xx(spool, collector):
    c, url = await collector(status(503), status(500), drop, ok)
    fill(spool, 3)
    transport = make_transport(spool, url, backoff_min_s=2, backoff_max_s=5)

    # Doubling from backoff_min_s, capped at backoff_max_s.
    for expected_delay, why in ((2.0, "HTTP 503"), (4.0, "HTTP 500"), (5.0, "ServerDisconnected")):
        attempt = await transport.attempt()
        assert attempt.outcome is Outcome.RETRY
        assert attempt.delay_s == expected_delay
        assert attempt.reason.startswith(why)
        assert [s for s, _ in spool.oldest(10, 10**9)] == [1, 2, 3]
    assert (await transport.attempt()).outcome is Outcome.DELIVERED
    assert spool.stats()["spool_reports"] == 0
    assert c.delivered == [1, 2, 3]
    await transport.close()


async def test_backoff_is_jittered_and_resets_after_a_delivery(spool, collector):
    c, url = await collector(status(503), status(503), ok, status(503), ok)
    fill(spool, 2)
    draws = iter([0.0, 1.0, 0.5])
    sleeps = Sleeps()
    transport = Transport(
        TransportConfig(url=url, batch_reports=1, backoff_min_s=4),
        spool,
        IDENTITY,
        sleep=sleeps,
        rng=lambda: next(draws),
        environ={},
    )
    await run_until_empty(transport)
    # Between half and all of the doubling ceiling (4, then 8); a delivery starts over at 4.
    assert sleeps.calls == [2.0, 8.0, 3.0]
    assert c.delivered == [1, 2]


async def test_retry_after_seconds_is_honoured(spool, collector):
    c, url = await collector(status(429, **{"Retry-After": "7"}), status(503, **{"Retry-After": "120"}), ok)
    fill(spool, 2)
    sleeps = Sleeps()
    await run_until_empty(make_transport(spool, url, sleeps))
    assert sleeps.calls == [7.0, 120.0]
    assert c.delivered == [1, 2]


async def test_retry_after_http_date_is_honoured_and_capped(spool, collector):
    in_90s = format_datetime(datetime.fromtimestamp(NOW + 90, timezone.utc), usegmt=True)
    in_a_day = format_datetime(datetime.fromtimestamp(NOW + 86_400, timezone.utc), usegmt=True)
    c, url = await collector(
        status(503, **{"Retry-After": in_90s}), status(503, **{"Retry-After": in_a_day}), ok
    )
    fill(spool, 1)
    sleeps = Sleeps()
    await run_until_empty(make_transport(spool, url, sleeps, retry_after_max_s=600))
    assert sleeps.calls == [90.0, 600.0]
    assert c.delivered == [1]


async def test_400_dead_letters_only_the_bad_reports_and_delivers_the_good_ones(spool, collector, tmp_path):
    bad = {3, 6}

    def validate(batch: wire.Batch) -> web.Response:
        for i, r in enumerate(batch.reports):
            if r.seq in bad:
                return status(400, "invalid value", f"$.reports[{i}].devices[0].busy_s")(batch)
        return ok(batch)

    c, url = await collector(validate)
    fill(spool, 8)
    await run_until_empty(make_transport(spool, url))

    assert sorted(c.delivered) == [1, 2, 4, 5, 7, 8]
    assert c.delivered == sorted(c.delivered)  # still in seq order
    assert spool.stats() | {"spool_bytes": 0} == {
        "spool_reports": 0,
        "spool_bytes": 0,
        "dropped_reports": 0,
        "lost_windows": 0,
        "dead_letter_reports": 2,
    }
    lines = [json.loads(line) for line in (tmp_path / "spool" / DEAD_LETTER_NAME).read_text().splitlines()]
    assert [line["seq"] for line in lines] == [3, 6]
    assert "invalid value" in lines[0]["reason"] and "$.reports[0].devices[0].busy_s" in lines[0]["reason"]
    assert len(c.requests) < 16, "bisection, not a retry loop"


async def test_400_about_the_agent_identity_keeps_every_report(spool, collector):
    _, url = await collector(status(400, "invalid value", "$.agent.labels"))
    fill(spool, 4)
    transport = make_transport(spool, url, auth_retry_s=45)
    attempt = await transport.attempt()
    assert attempt.outcome is Outcome.RETRY and attempt.delay_s == 45
    assert spool.stats()["spool_reports"] == 4
    assert spool.stats()["dead_letter_reports"] == 0
    await transport.close()


async def test_401_and_403_keep_everything_and_retry_slowly_without_logging_the_token(
    spool, collector, caplog
):
    c, url = await collector(status(401, "unauthorized"), status(403, "forbidden"), ok)
    fill(spool, 3)
    sleeps = Sleeps()
    transport = make_transport(spool, url, sleeps, auth_retry_s=60)

    with caplog.at_level(logging.DEBUG):
        assert (await transport.attempt()).outcome is Outcome.RETRY
        assert spool.stats()["spool_reports"] == 3
        await run_until_empty(transport)
    assert sleeps.calls == [60.0]
    assert c.delivered == [1, 2, 3]
    assert "401" in caplog.text and "403" in caplog.text
    assert TOKEN not in caplog.text


async def test_413_halves_the_batch_until_it_fits(spool, collector):
    def small_only(batch: wire.Batch) -> web.Response:
        return ok(batch) if len(batch.reports) <= 3 else status(413, "too large")(batch)

    c, url = await collector(small_only)
    fill(spool, 10)
    transport = make_transport(spool, url, batch_reports=12)
    await run_until_empty(transport)
    assert c.delivered == list(range(1, 11))
    assert transport.batch_reports <= 3
    assert spool.stats()["dead_letter_reports"] == 0


async def test_413_for_a_single_report_dead_letters_it_rather_than_loop(spool, collector):
    def not_two(batch: wire.Batch) -> web.Response:
        return status(413, "too large")(batch) if any(r.seq == 2 for r in batch.reports) else ok(batch)

    c, url = await collector(not_two)
    fill(spool, 3)
    await run_until_empty(make_transport(spool, url))
    assert c.delivered == [1, 3]
    assert spool.stats()["dead_letter_reports"] == 1


async def test_an_unreachable_collector_is_retried_and_nothing_is_lost(spool, unused_tcp_port):
    fill(spool, 2)
    transport = make_transport(spool, f"http://127.0.0.1:{unused_tcp_port}/api/v1/reports")
    attempt = await transport.attempt()
    assert attempt.outcome is Outcome.RETRY
    # Said as a person would, without aiohttp's "ssl:default" for a plain-http URL.
    assert attempt.reason == f"cannot connect to http://127.0.0.1:{unused_tcp_port}: Connection refused"
    assert spool.stats()["spool_reports"] == 2
    await transport.close()


async def test_uncompressed_bodies_when_gzip_is_off_and_the_env_token_wins(spool, collector):
    c, url = await collector(ok)
    fill(spool, 1)
    transport = Transport(
        TransportConfig(url=url, token="from-file", gzip=False),
        spool,
        IDENTITY,
        sleep=Sleeps(),
        environ={"CAPMON_AGENT_TOKEN": "from-env"},
    )
    await run_until_empty(transport)
    assert "Content-Encoding" not in c.requests[0].headers
    assert c.requests[0].headers["Authorization"] == "Bearer from-env"
    assert c.delivered == [1]


async def test_stop_interrupts_a_backoff(spool, collector):
    c, url = await collector(status(503, **{"Retry-After": "3600"}))
    fill(spool, 1)
    transport = Transport(TransportConfig(url=url), spool, IDENTITY, environ={})
    task = asyncio.create_task(transport.run())
    await asyncio.wait_for(c.got_request.wait(), 5)
    transport.stop()
    await asyncio.wait_for(task, 5)
    assert spool.stats()["spool_reports"] == 1


def test_config_rejects_what_cannot_work():
    with pytest.raises(ValueError, match="http"):
        TransportConfig(url="collector:8080")
    with pytest.raises(ValueError, match="cert_file and key_file"):
        TransportConfig(url="https://c/api/v1/reports", cert_file="agent.pem")
    with pytest.raises(ValueError, match="batch_reports"):
        TransportConfig(url="https://c/api/v1/reports", batch_reports=5000)


@pytest.fixture
def self_signed(tmp_path):
    """A certificate for 127.0.0.1 that is its own CA (openssl CLI)."""
    cert, key = tmp_path / "collector.pem", tmp_path / "collector.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")
async def test_tls_verifies_the_collector_against_the_configured_ca_bundle(
    spool, aiohttp_server, self_signed
):
    cert, key = self_signed
    server_ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ssl.load_cert_chain(cert, key)
    c = Collector(ok)
    app = web.Application()
    app.router.add_post("/api/v1/reports", c.handle)
    server = await aiohttp_server(app, ssl=server_ssl)
    url = f"https://127.0.0.1:{server.port}/api/v1/reports"
    fill(spool, 1)

    untrusting = make_transport(spool, url)  # the system trust store does not know this CA
    attempt = await untrusting.attempt()
    assert attempt.outcome is Outcome.RETRY and "certificate verify failed" in attempt.reason
    await untrusting.close()

    await run_until_empty(make_transport(spool, url, ca_file=str(cert)))
    assert c.delivered == [1]


async def test_reports_stored_before_a_lost_answer_are_never_also_counted_as_dropped(tmp_path, collector):
    # Issue 11.3: the collector stored a batch, the answer was lost (cut connection), the spool bound
    # then dropped that batch and counted it: per agent, delivered + dropped exceeded produced.
    stored: set[int] = set()

    def stored_then_cut(batch: wire.Batch) -> web.StreamResponse:
        stored.update(r.seq for r in batch.reports)
        raise ConnectionDropped

    c, url = await collector(stored_then_cut, ok)
    one = len(
        wire.encode(
            wire.Report(
                seq=1,
                start=1_700_000_000,
                end=1_700_000_060,
                devices=[wire.DeviceWindow(device_id="GPU-0", vendor="nvidia", state="free", free_s=60.0)],
            )
        )
    )
    spool = Spool.open(SpoolConfig(path=str(tmp_path / "s"), max_bytes=int(one * 3.5)), clock=lambda: NOW)
    try:
        fill(spool, 3)
        transport = make_transport(spool, url)
        assert (await transport.attempt()).outcome is Outcome.RETRY
        fill(spool, 3)  # over the bound while 1-3 may be in the store
        while (await transport.attempt()).outcome is not Outcome.EMPTY:
            pass
        stored.update(c.delivered)
        produced = spool.last_seq
        dropped = spool.stats()["dropped_reports"]
        assert (produced, dropped) == (6, 3)
        assert len(stored) + dropped == produced
        await transport.close()
    finally:
        spool.close()


async def test_stopping_with_an_unreachable_collector_tries_once_and_keeps_everything(spool, unused_tcp_port):
    fill(spool, 3)
    sleeps = Sleeps()
    transport = make_transport(spool, f"http://127.0.0.1:{unused_tcp_port}/api/v1/reports", sleeps)
    transport.finish(retry=False)
    await transport.run()
    assert sleeps.calls == []  # nothing to wait for: the spool is durable
    assert spool.stats()["spool_reports"] == 3


async def test_stopping_cuts_a_long_backoff_short(spool, collector):
    c, url = await collector(status(503, **{"Retry-After": "3000"}))
    fill(spool, 1)
    transport = Transport(TransportConfig(url=url), spool, IDENTITY, environ={})  # its real sleep
    task = asyncio.create_task(transport.run())
    await c.got_request.wait()
    await asyncio.sleep(0)
    transport.finish(retry=False)
    await asyncio.wait_for(task, 60)  # not the 3000 s the collector asked for
    assert spool.stats()["spool_reports"] == 1


async def test_a_spool_that_cannot_be_written_holds_delivery_without_a_traceback(spool, collector, caplog):
    c, url = await collector(ok)
    fill(spool, 2)
    spool._db.execute("PRAGMA query_only = 1")  # SQLite refuses every write, as on a read-only disk
    sleeps = Sleeps()
    transport = make_transport(spool, url, sleeps)
    for _ in range(3):
        assert (await transport.attempt()).outcome is Outcome.RETRY
    transport.finish(retry=False)
    await transport.run()
    # Nothing is sent that could not then be taken out of the spool: no resend loop.
    assert c.received == []
    assert "Traceback" not in caplog.text and "unexpectedly" not in caplog.text
    assert caplog.text.count("cannot be written") == 1
    spool._db.execute("PRAGMA query_only = 0")
    await run_until_empty(make_transport(spool, url))
    assert c.delivered == [1, 2]


async def test_a_403_for_another_agent_id_says_change_the_id_or_the_tokens_patterns(spool, collector, caplog):
    detail = "this token may not write as agent id 'node-1'; it may write as 'gpu-*'"

    def wrong_agent(batch: wire.Batch) -> web.Response:
        return web.json_response({"error": "forbidden", "detail": detail, "path": "$.agent.id"}, status=403)

    _, url = await collector(wrong_agent)
    fill(spool, 1)
    transport = make_transport(spool, url, auth_retry_s=60)
    with caplog.at_level(logging.INFO):
        attempt = await transport.attempt()
    await transport.close()
    assert attempt.outcome is Outcome.RETRY and attempt.delay_s == 60
    assert (
        "the collector's token is not bound to agent id 'node-1': change [agent] id or the token's agents "
        "patterns on the collector" in caplog.text
    )
    assert detail in caplog.text  # the collector names the patterns this token may write as
    assert "set the token" not in caplog.text and TOKEN not in caplog.text


def test_no_token_at_all_is_one_warning_at_start(spool, caplog):
    with caplog.at_level(logging.INFO):
        make_transport(spool, "http://127.0.0.1:9/api/v1/reports", token="")
        make_transport(spool, "http://127.0.0.1:9/api/v1/reports")  # a token: nothing to say
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == [
        "no token for the collector at http://127.0.0.1:9/api/v1/reports: set [transport] token or "
        "$CAPMON_AGENT_TOKEN (a collector that checks tokens refuses every report with HTTP 401)"
    ]


async def test_delivery_is_confirmed_after_start_and_after_a_recovery_never_per_window(
    spool, collector, caplog
):
    c, url = await collector(ok, ok, status(503), status(503), ok)
    sleeps = Sleeps()
    transport = make_transport(spool, url, sleeps)

    def infos() -> list[str]:
        lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
        caplog.clear()
        return lines

    with caplog.at_level(logging.INFO, logger="capmon.agent.transport"):
        fill(spool, 3)
        await run_until_empty(transport)
        assert infos() == [f"delivered 3 report(s) to {url}; spool empty"]
        fill(spool, 1)  # steady state: a window delivered at once says nothing
        await run_until_empty(transport)
        assert infos() == []
        fill(spool, 2)  # the collector fails twice, then takes them
        await run_until_empty(transport)
        assert infos() == [
            f"delivering to {url} again after 2 failed attempt(s)",
            f"delivered 2 report(s) to {url}; spool empty",
        ]
    assert c.delivered == [1, 2, 3, 4, 5, 6]


async def test_stopping_with_the_collector_down_says_only_what_is_true(spool, unused_tcp_port, caplog):
    fill(spool, 3)
    url = f"http://127.0.0.1:{unused_tcp_port}/api/v1/reports"
    transport = make_transport(spool, url)
    transport.finish(retry=False)
    with caplog.at_level(logging.INFO, logger="capmon.agent.transport"):
        await transport.run()
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        f"delivery to {url} failed (cannot connect to http://127.0.0.1:{unused_tcp_port}: Connection refused); "
        "not retrying while stopping; 3 report(s) stay spooled"
    ]
