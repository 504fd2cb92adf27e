"""`capmon demo`: real agents on simulated devices deliver to a real collector, and the table shows them."""

from __future__ import annotations

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
