"""collector/README.md documents what remote write sends about holders (capmon_holder_info)."""

from __future__ import annotations

from pathlib import Path

import msgspec
from collector_helpers import batch, device, report

from capmon.agent.wire import Batch
from capmon.collector.lineproto import batch_lines
from capmon.collector.remote_write import series_of_lines

README = (Path(__file__).parents[2] / "collector" / "README.md").read_text()


def test_every_label_of_capmon_holder_info_is_documented_and_never_the_pid():
    holder = {
        "pid": 4242, "user": "u", "namespace": "n", "runtime": "docker", "pod": "p", "container": "k",
        "slurm_job_id": "9", "command": "python3", "held_s": 1.0,
    }  # fmt: skip
    data = msgspec.convert(batch([report(devices=[device(state="allocated_idle", holders=[holder])])]), Batch)
    [info] = [
        dict(labels)
        for labels, _, _ in series_of_lines(batch_lines(data, ("site", "cluster", "pool")))
        if dict(labels)["__name__"] == "capmon_holder_info"
    ]
    assert "pid" not in info and "4242" not in info.values()
    section = README.split("### `capmon_holder_info`", 1)[1].split("\n### ", 1)[0]
    assert "value 1" in section and "Never the pid" in section
    for key in set(info) - {"__name__", "site", "cluster", "pool"}:
        assert f"`{key}`" in section, key
