"""`capmon.testing.npu_smi`: a command runner for `AscendProbe(run=...)` that replays recorded `npu-smi`
output, or a scripted sequence of outputs, failures and hangs, with no NPU and no binary.

    runner = NpuSmiRunner(recorded("info_910b3_8npu_v25.2.0_with_process_empty_name.txt"))
    probe = AscendProbe(run=runner)

The recordings (`fixtures()` lists them; `SOURCES.md` beside them says where each comes from) ship
with the package.
"""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources

__all__ = ["Exit", "Hang", "NpuSmiRunner", "fixtures", "mapping_for", "recorded"]

_DIR = "fixtures/ascend"
# The per-NPU calls (`npu-smi info -t <type> -i N`) answered by default: recorded 910B outputs.
DEFAULT_T = {
    "board": "info_t_board_910b_v25.5.1_telegraf.txt",
    "usages": "info_t_usages_910b_v25.5.1_telegraf.txt",
    "health": "info_t_health_a5_atlas350_doc.txt",
}


def fixtures() -> list[str]:
    """Names of the recorded outputs shipped with capmon."""
    root = resources.files("capmon.testing").joinpath(_DIR)
    return sorted(p.name for p in root.iterdir() if p.name.endswith(".txt"))


def recorded(name: str) -> str:
    """The text of one recorded output, by file name (see `fixtures()`)."""
    path = resources.files("capmon.testing").joinpath(_DIR, name)
    if not path.is_file():
        raise FileNotFoundError(
            f"no recorded npu-smi output {name!r} (known: see capmon.testing.npu_smi.fixtures())"
        )
    return path.read_text(encoding="utf-8")


def mapping_for(table: str) -> str:
    """The `npu-smi info -m` a host printing `table` (a default `npu-smi info` output) would print:
    logic ids in NPU order, as DCMI numbers them on a host that sees all its chips (the table's
    `Device` column where it has one); a table without chip ids (Ascend 950) gets the 950 layout,
    `Slot ID` and `Chip Phy-ID` with no logic id. Empty when the table lists no chips."""
    from capmon.plugins.ascend.parser import parse_npu_smi_info

    chips = parse_npu_smi_info(table).chips if isinstance(table, str) else ()
    if not chips:
        return ""
    row = "{:<16}" * 4 + "{}"
    if all(not c.chip_id_printed for c in chips):
        lines = [row.format("NPU ID", "Slot ID", "Chip ID", "Chip Phy-ID", "Chip Name")]
        lines += [row.format(c.npu_id, i, c.chip_id, i, c.name or "xxx") for i, c in enumerate(chips)]
    else:
        row = "{:<31}" * 3 + "{}"
        lines = [row.format("NPU ID", "Chip ID", "Chip Logic ID", "Chip Name")]
        lines += [
            row.format(
                c.npu_id, c.chip_id, i if c.logic_id is None else c.logic_id, f"Ascend {c.name or 'xxx'}"
            )
            for i, c in enumerate(chips)
        ]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Exit:
    """npu-smi exiting with `code`, printing `stdout` (npu-smi prints its errors there) and `stderr`."""

    code: int
    stdout: str = ""
    stderr: str = ""


@dataclass(frozen=True)
class Hang:
    """npu-smi that does not answer: the runner raises `subprocess.TimeoutExpired` as the real one
    does when the timeout passes. `wait_s` blocks that long first (capped by the call's timeout), for
    testing what the agent does while a call is stuck; `release()` on the runner ends every wait."""

    wait_s: float = 0.0


Answer = str | Exit | Hang | BaseException | Callable[[Sequence[str]], "Answer"]


class NpuSmiRunner:
    """A `CommandRunner` for `npu-smi`: `npu-smi info` answers come from `answers` in order (the last
    repeats), each a text (exit 0), an `Exit`, a `Hang`, an exception to raise (`OSError`), or a
    function of argv returning one of those. `npu-smi info -t <type> -i N` answers come from `t`
    (by type), else from recorded 910B outputs; `npu-smi info -m` from `m`, else `mapping_for` the
    first text answer. Every call is kept in `calls`, as (argv, timeout_s)."""

    def __init__(
        self, *answers: Answer, t: Mapping[str, Answer] | None = None, m: Answer | None = None
    ) -> None:
        if not answers:
            raise ValueError("NpuSmiRunner needs at least one answer for `npu-smi info`")
        self.answers = list(answers)
        self.t: dict[str, Answer] = {k: recorded(v) for k, v in DEFAULT_T.items()} | dict(t or {})
        if m is None:
            table = next((a for a in answers if isinstance(a, str)), None)
            m = mapping_for(table) if table is not None else Exit(255, "")
        self.m: Answer = m
        self.calls: list[tuple[list[str], float]] = []
        self._released = threading.Event()
        self._lock = threading.Lock()

    @classmethod
    def recorded(cls, name: str, **kw: Mapping[str, Answer]) -> NpuSmiRunner:
        """A runner that answers `npu-smi info` with one recorded output, always."""
        return cls(recorded(name), **kw)

    def __call__(self, argv: Sequence[str], timeout_s: float) -> tuple[int, str, str]:
        argv = list(argv)
        with self._lock:
            self.calls.append((argv, timeout_s))
            if argv[1:] == ["info", "-m"]:
                answer = self.m
            elif "-t" in argv:
                kind = argv[argv.index("-t") + 1] if argv.index("-t") + 1 < len(argv) else ""
                answer = self.t.get(kind, Exit(255, f"Unknown type {kind!r}.\n"))
            else:
                answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        return self._answer(answer, argv, timeout_s)

    def _answer(self, answer: Answer, argv: list[str], timeout_s: float) -> tuple[int, str, str]:
        if callable(answer) and not isinstance(answer, type):
            answer = answer(argv)
        if isinstance(answer, BaseException) or (
            isinstance(answer, type) and issubclass(answer, BaseException)
        ):
            raise answer
        if isinstance(answer, Hang):
            if answer.wait_s:
                self._released.wait(min(answer.wait_s, timeout_s))
            raise subprocess.TimeoutExpired(argv, timeout_s)
        if isinstance(answer, Exit):
            return answer.code, answer.stdout, answer.stderr
        if isinstance(answer, str):
            return 0, answer, ""
        raise TypeError(f"NpuSmiRunner answer must be text, Exit, Hang or an exception, got {answer!r}")

    def release(self) -> None:
        """End every `Hang(wait_s=...)` in progress now."""
        self._released.set()

    def info_calls(self) -> list[list[str]]:
        """The `npu-smi info` calls (the table), without the per-NPU `-t` calls and `-m`."""
        return [argv for argv, _ in self.calls if "-t" not in argv and "-m" not in argv]
