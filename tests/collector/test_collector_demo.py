"""`capmon demo`: real agents on simulated devices deliver to a real collector, and the table shows them."""

from __future__ import annotations

import asyncio
import io
import socket
import subprocess
import sys

from capmon.collector.demo import default_args, run_demo


async def test_demo_shows_the_simulated_fleet_within_seconds():
    args = default_args(hosts=3, devices=4, window=1, port=0, seconds=3.5)
    out = io.StringIO()
    await run_demo(args, out)
    text = out.getvalue()
    last = text.rsplit("capmon fleet", 1)[1]
    assert "3 agents, 12 devices" in last
    # 3 hosts from mock_fleet(3, 4): the training host's 4 devices are busy ×2, idle, notebook, and so on;
    # every state the classifier produces must be visible, with idle devices listed longest first.
    assert "FREE " in last and "BUSY " in last
    assert "LONGEST IDLE" in last and "MOCK-" in last.split("LONGEST IDLE", 1)[1]
    assert "capmon demo stopped." in text


def test_a_port_in_use_is_one_line_and_exit_1():
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "capmon.agent.cli", "demo", "--port", str(port), "--seconds", "1"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert proc.returncode == 1
    assert proc.stderr == (
        f"capmon demo: cannot listen on 127.0.0.1:{port}: address already in use "
        "(try --port 0 or another port)\n"
    )
    assert proc.stdout == ""


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


async def test_on_a_terminal_every_frame_keeps_the_curl_hint_below_the_table():
    args = default_args(hosts=1, devices=2, window=1, port=0, seconds=2.5)
    out = _Terminal()
    await run_demo(args, out)
    frames = out.getvalue().split("\x1b[2J\x1b[H")[1:]
    assert len(frames) >= 2
    for frame in frames:
        _table, hint = frame.split("LONGEST IDLE", 1)[1].split("\n\n", 1)
        assert hint.startswith("  try: curl -s -H 'Authorization: Bearer demo-read-token' http://127.0.0.1:")


def _demo(*argv: str, block: str = "") -> subprocess.CompletedProcess[str]:
    """The real `capmon demo` in a subprocess; `block` names a module the interpreter cannot import
    (a plain `pip install .` without that extra)."""
    code = (
        "import sys\n"
        + (f"sys.modules[{block!r}] = None\n" if block else "")
        + "from capmon.agent.cli import main\n"
        + "sys.exit(main(sys.argv[1:]))\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code, "demo", "--port", "0", *argv],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_without_influxdb_client_the_v2_store_is_one_line_and_exit_1():
    proc = _demo("--influx-url", "http://127.0.0.1:9", "--seconds", "1", block="influxdb_client")
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1
    assert proc.stderr.startswith(
        "capmon demo: --influx-version 2 writes through the influxdb-client package"
    )
    assert "pip install '.[collector]' in a capmon checkout (README: Install)" in proc.stderr
    assert proc.stdout == ""


def test_v2_against_an_influxdb_1_x_says_use_version_1_once_at_start(influxd):
    proc = _demo("--influx-url", influxd.url, "--influx-org", "o", "--influx-token", "t", "--seconds", "1")
    assert proc.returncode == 1
    assert proc.stderr == (
        f"capmon demo: {influxd.url} is InfluxDB 1.6.7~rc0, which has no v2 write API: "
        "use --influx-version 1\n"
    )
    assert proc.stdout == ""


def test_an_unreachable_store_is_one_line_before_any_agent_starts():
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    proc = _demo("--influx-url", f"http://127.0.0.1:{port}", "--influx-version", "1", "--seconds", "1")
    assert proc.returncode == 1
    assert (
        proc.stderr == f"capmon demo: cannot reach InfluxDB at http://127.0.0.1:{port}: connection refused\n"
    )


def test_the_demo_writes_to_an_influxdb_1_x_and_never_promises_a_restart(influxd):
    # The collector down for the agents' last window: the reports left behind are the demo's to drop.
    proc = _demo(
        "--influx-url",
        influxd.url,
        "--influx-version",
        "1",
        "--hosts",
        "1",
        "--devices",
        "2",
        "--window",
        "1",
        "--seconds",
        "2",
    )
    assert proc.returncode == 0, proc.stderr
    assert "sent when the agent starts again" not in proc.stderr
    assert "Traceback" not in proc.stderr
    assert influxd.rows("SELECT count(*) FROM capmon_device", "capmon")


async def test_seconds_shorter_than_a_window_ends_the_demo_with_the_whole_run_shown():
    # --seconds 1 with 60 s windows: the demo used to wait a whole window for its first frame.
    args = default_args(hosts=1, devices=2, window=60, port=0, seconds=1)
    out = io.StringIO()
    await asyncio.wait_for(run_demo(args, out), 30)  # a guard against a hang, not a speed bound
    text = out.getvalue()
    assert text.count("capmon fleet") == 1
    last = text.rsplit("capmon fleet", 1)[1]
    # The agents stopped first and delivered their partial window, so the frame holds the run.
    assert "1 agent, 2 devices" in last
    assert "MOCK-000-" in last.split("LONGEST IDLE", 1)[1]
    assert "1 simulated host × 2 devices, 60s windows" in text
    assert "1 agents" not in text and "1 simulated hosts" not in text
