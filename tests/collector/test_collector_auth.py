"""Auth: who may write as which agent, who may read, and that tokens never reach the logs."""

from __future__ import annotations

import logging

import pytest
from collector_helpers import (
    AGENT_TOKEN,
    JSON,
    RACK_TOKEN,
    READ_TOKEN,
    Clock,
    RecordingWriter,
    auth,
    batch,
    body,
    make_config,
)

from capmon.collector.app import create_app
from capmon.collector.auth import TokenStore
from capmon.collector.config import AuthConfig, TokenConfig


@pytest.fixture
def writer() -> RecordingWriter:
    return RecordingWriter()


@pytest.fixture
async def client(aiohttp_client, writer):
    return await aiohttp_client(create_app(make_config(), writer=writer, clock=Clock()))


async def ingest(client, headers, agent_id="node-1"):
    return await client.post(
        "/api/v1/reports", data=body(batch(agent_id=agent_id)), headers={**JSON, **headers}
    )


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        (auth("not-a-token"), 401),
        ({"Authorization": f"Basic {AGENT_TOKEN}"}, 401),
        ({"Authorization": "Bearer "}, 401),
        (auth(READ_TOKEN), 403),
        (auth(AGENT_TOKEN), 200),
    ],
)
async def test_ingest_auth(client, writer, headers, status):
    resp = await ingest(client, headers)
    assert resp.status == status, await resp.text()
    assert (writer.lines != []) == (status == 200)
    if status == 401:
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")


async def test_agent_token_writes_only_as_its_agents(client, writer):
    resp = await ingest(client, auth(AGENT_TOKEN), agent_id="node-2")
    assert resp.status == 403
    assert (await resp.json())["path"] == "$.agent.id"
    assert (await ingest(client, auth(RACK_TOKEN), agent_id="rack2-node-17")).status == 200
    assert (await ingest(client, auth(RACK_TOKEN), agent_id="rack3-node-1")).status == 403
    assert all("rack3" not in line for line in writer.lines)


@pytest.mark.parametrize(
    "path", ["/api/v1/fleet", "/api/v1/devices", "/api/v1/holders", "/api/v1/agents", "/metrics"]
)
async def test_read_apis_need_a_read_token(client, path):
    assert (await client.get(path)).status == 401
    assert (await client.get(path, headers=auth("nope"))).status == 401
    assert (await client.get(path, headers=auth(AGENT_TOKEN))).status == 403
    assert (await client.get(path, headers=auth(READ_TOKEN))).status == 200


async def test_healthz_needs_no_token(client):
    resp = await client.get("/healthz")
    assert resp.status == 200 and (await resp.json())["status"] == "ok"


async def test_tokens_never_logged(client, caplog):
    caplog.set_level(logging.DEBUG)
    await ingest(client, auth(AGENT_TOKEN))
    await ingest(client, auth(AGENT_TOKEN), agent_id="node-9")
    await ingest(client, auth(READ_TOKEN))
    await ingest(client, auth("wrong-token-abcdef"))
    await client.get("/api/v1/fleet", headers=auth(AGENT_TOKEN))
    await client.get("/metrics", headers=auth(READ_TOKEN))
    assert caplog.records, "expected the refusals to be logged"
    for secret in (AGENT_TOKEN, READ_TOKEN, RACK_TOKEN, "wrong-token-abcdef"):
        assert secret not in caplog.text


def test_env_token_and_patterns():
    store = TokenStore(
        AuthConfig(agent_tokens=(TokenConfig(env="TOK", agents=("a-*", "b")),)), env={"TOK": "s3cret"}
    )
    p = store.authenticate("Bearer s3cret")
    assert p is not None and p.role == "agent"
    assert p.may_write_as("a-1") and p.may_write_as("b") and not p.may_write_as("bb")
    assert store.authenticate("bearer s3cret") is not None
    assert store.authenticate("Bearer s3cre") is None
    assert "s3cret" not in repr(p)


async def test_a_wrong_agent_id_is_refused_naming_the_id_and_the_tokens_patterns(client, caplog):
    """The operator must see whether `[agent] id` or the token's `agents` is wrong, never the token."""
    caplog.set_level(logging.INFO, logger="capmon.collector")
    resp = await ingest(client, auth(RACK_TOKEN), agent_id="rack3-node-1")
    assert resp.status == 403
    answer = await resp.json()
    assert answer["path"] == "$.agent.id"
    assert "agent id 'rack3-node-1'" in answer["detail"] and "may write as 'rack2-*'" in answer["detail"]
    [line] = [r.getMessage() for r in caplog.records if "may not write" in r.getMessage()]
    assert "'rack3-node-1'" in line and "'rack2-*'" in line and "rack2" in line
    assert RACK_TOKEN not in caplog.text and RACK_TOKEN not in answer["detail"]


def test_a_token_with_many_patterns_is_named_with_a_bounded_list():
    from capmon.collector.ingest import _patterns

    assert _patterns(("a-*", "b")) == "'a-*', 'b'"
    many = _patterns(tuple(f"rack{i}-*" for i in range(20)))
    assert many.startswith("'rack0-*', 'rack1-*'") and many.endswith("'rack7-*' and 12 more")


@pytest.mark.parametrize(
    "path", ["/api/v1/fleet", "/api/v1/devices", "/api/v1/holders", "/api/v1/agents", "/metrics"]
)
async def test_the_wrong_kind_of_token_reads_in_plain_english(client, path):
    resp = await client.get(path, headers=auth(AGENT_TOKEN))
    assert resp.status == 403 and (await resp.json())["detail"] == "an agent token cannot read the fleet"
    resp = await ingest(client, auth(READ_TOKEN))
    assert resp.status == 403 and (await resp.json())["detail"] == "a read token cannot write reports"
