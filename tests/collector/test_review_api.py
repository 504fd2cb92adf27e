"""The read APIs' parameters, alike on every endpoint: unknown ones refused, numbers in ASCII digits
only, durations finite and bounded (review of the collector's read APIs)."""

from __future__ import annotations

import pytest
from collector_helpers import READ_TOKEN, Clock, RecordingWriter, auth, make_config

from capmon.collector.app import MAX_DURATION_S, create_app, parse_duration

READ_PATHS = ["/api/v1/fleet", "/api/v1/devices", "/api/v1/holders", "/api/v1/agents"]


@pytest.fixture
async def client(aiohttp_client):
    return await aiohttp_client(create_app(make_config(), writer=RecordingWriter(), clock=Clock()))


async def get(client, path, **params):
    resp = await client.get(path, params=params, headers=auth(READ_TOKEN))
    return resp.status, await resp.json()


@pytest.mark.parametrize("path", READ_PATHS)
async def test_every_read_endpoint_refuses_an_unknown_parameter_alike(client, path):
    status, answer = await get(client, path, x="1")
    assert status == 400 and answer["error"] == "unknown parameter"
    assert answer["detail"].startswith("'x'; known: ")
    assert (await get(client, path))[0] == 200


@pytest.mark.parametrize(
    "value",
    [
        "１",  # fullwidth digit one
        "1_0",  # int() takes underscores
        "+5",
        " 5",
        "١",  # Arabic-Indic digit one
        "5.0",
        "1" * 4000,
    ],
)
@pytest.mark.parametrize("path", ["/api/v1/devices", "/api/v1/holders"])
async def test_limit_is_ascii_digits_only(client, path, value):
    status, answer = await get(client, path, limit=value)
    assert status == 400 and answer["detail"].startswith("limit: an integer 1..100000")


@pytest.mark.parametrize(
    "value",
    [
        "١",
        "１２",
        "１２m",
        "9" * 400,  # float() makes this inf
        "9" * 400 + ".5",
        "1e309",
        "inf",
        "nan",
        "36501d",  # above 100 years
        "1_0",
        "+5",
    ],
)
@pytest.mark.parametrize("path", ["/api/v1/devices", "/api/v1/holders"])
async def test_min_idle_is_a_finite_bounded_ascii_duration(client, path, value):
    status, answer = await get(client, path, min_idle=value)
    assert status == 400 and answer["detail"].startswith("min_idle: "), answer


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("0", 0.0), ("90", 90.0), ("90s", 90.0), ("1.5m", 90.0), (" 2h ", 7200.0), ("1d", 86400.0),
     ("36500d", float(MAX_DURATION_S))],
)  # fmt: skip
def test_durations_people_write_still_parse(text, seconds):
    assert parse_duration(text) == seconds


async def test_good_parameters_still_answer(client):
    assert (await get(client, "/api/v1/devices", limit="5", min_idle="15m", state="idle"))[0] == 200
    assert (await get(client, "/api/v1/holders", limit="100000", min_idle="36500d"))[0] == 200


@pytest.mark.parametrize("path", READ_PATHS)
async def test_no_parameter_of_a_read_api_can_be_a_label_key(client, path):
    """A label named like a parameter (`limit`, `by`) could never be filtered by: the config refuses it."""
    from capmon.collector.config import ConfigError, parse

    _, answer = await get(client, path, x="1")
    known = answer["detail"].split("; known: ", 1)[1].split(", ")
    for name in set(known) - {"site", "cluster", "pool", "none"}:
        with pytest.raises(ConfigError, match=rf"label_keys\[0\]: '{name}' is a"):
            parse(f"[collector]\nlabel_keys = ['{name}']\n", "c.toml", env={})
