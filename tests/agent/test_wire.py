"""The wire protocol's error paths, which the transport uses to tell a bad report from a bad identity."""

from __future__ import annotations

import msgspec
import pytest

from capmon.agent import wire

BATCH = b'{"agent":{"id":"a","host":"h","labels":%s},"reports":[{"seq":1,"start":1700000000,"end":1700000060,"devices":[%s]}]}'


def reject(body: bytes) -> tuple[str, str | None]:
    with pytest.raises(msgspec.ValidationError) as info:
        wire.decode_batch(body)
    return wire.split_error(info.value)


def test_a_bad_label_key_points_at_the_labels_not_at_a_key_named_key():
    reason, path = reject(BATCH % (b'{"Site":"x"}', b""))
    assert path == "$.agent.labels" and "(a key)" in reason


def test_a_bad_field_points_at_the_field():
    device = b'{"device_id":"g","vendor":"nvidia","state":"free","util_mean_pct":150}'
    reason, path = reject(BATCH % (b"{}", device))
    assert path == "$.reports[0].devices[0].util_mean_pct" and "<= 100" in reason
