"""Pure readers of what Slurm prints: `scontrol show job -d`, gres.conf, hostlists, and the jobstats
prolog's files. Text in, records out; nothing here runs a command or raises on odd input it can skip.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

__all__ = [
    "GresUse",
    "JobNodes",
    "SlurmJob",
    "device_of_file",
    "expand_hostlist",
    "parse_gres_conf",
    "parse_gres_detail",
    "parse_index_list",
    "parse_jobstats_file",
    "parse_key_values",
    "parse_scontrol_jobs",
]

# `key=value` pairs of scontrol's output; a value runs to the next space (scontrol prints none inside
# the fields read here; `Command=`/`WorkDir=` paths with spaces are not read).
_PAIR = re.compile(r"([A-Za-z_/:]+)=(\S*)")
_DEVICE_FILE = re.compile(r"/(nvidia|davinci)(\d+)$")
_VENDOR_OF_FILE = {"nvidia": "nvidia", "davinci": "ascend"}


@dataclass(frozen=True, slots=True)
class GresUse:
    """One GRES item of a job on a node: `gpu:a100:2(IDX:0,2)` → name gpu, type a100, indices (0, 2)."""

    name: str
    type: str | None
    count: int | None
    indices: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class JobNodes:
    """One `Nodes=… GRES=…` detail line of a job: the nodes it names and the GRES it gives each."""

    nodes: tuple[str, ...]
    gres: tuple[GresUse, ...]


@dataclass(frozen=True, slots=True)
class SlurmJob:
    job_id: str
    state: str | None
    user: str | None
    uid: int | None
    partition: str | None
    start_time: float | None
    array_job_id: str | None
    details: tuple[JobNodes, ...]

    def gres_on(self, node: str) -> tuple[GresUse, ...]:
        """The GRES this job holds on `node` (nothing when no detail line names it)."""
        return tuple(g for d in self.details if node in d.nodes for g in d.gres)


def parse_key_values(text: str) -> dict[str, str]:
    """`Key = Value` lines (`scontrol show config`) into a dict; other lines are skipped."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() and " " not in key.strip():
            out[key.strip()] = value.strip()
    return out


def parse_index_list(text: str) -> tuple[int, ...] | None:
    """`0-1,3` → (0, 1, 3); None when it is not an index list (`N/A`, empty)."""
    out: list[int] = []
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            return None
        out.extend(range(int(lo), int(hi) + 1) if sep else (int(lo),))
    return tuple(out)


def _split_top(text: str, sep: str = ",") -> list[str]:
    """Split on `sep` outside parentheses and brackets (`gpu:2(IDX:0,2),gpu:1(IDX:3)`, `a[1,3],b`)."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p for p in parts if p]


_GRES_ITEM = re.compile(r"^(?P<spec>[^()]+?)(?:\((?P<detail>[^)]*)\))?$")


def parse_gres_detail(text: str) -> tuple[GresUse, ...]:
    """A job's per-node GRES (`gpu:2(IDX:0-1)`, `gpu:a100:2(IDX:0,2)`, several joined by commas).

    Items without `IDX:` (count-only GRES such as `mps:100(0/100)`, `(null)`) are left out: they name
    no device.
    """
    out: list[GresUse] = []
    for item in _split_top(text.strip()):
        m = _GRES_ITEM.match(item.strip())
        if not m or not m.group("detail") or not m.group("detail").startswith("IDX:"):
            continue
        indices = parse_index_list(m.group("detail")[4:])
        if indices is None:
            continue
        fields = m.group("spec").split(":")
        name = fields[0]
        count = int(fields[-1]) if len(fields) > 1 and fields[-1].isdigit() else None
        gres_type = fields[1] if len(fields) == 3 or (len(fields) == 2 and count is None) else None
        out.append(GresUse(name=name, type=gres_type, count=count, indices=indices))
    return tuple(out)


def expand_hostlist(text: str) -> tuple[str, ...]:
    """Slurm's hostlist expressions: `gpu[01-03,07],login1` → gpu01 gpu02 gpu03 gpu07 login1."""
    out: list[str] = []
    for part in _split_top(text.strip()):
        out.extend(_expand_one(part))
    return tuple(out)


def _expand_one(name: str) -> list[str]:
    m = re.search(r"\[([^\]]*)\]", name)
    if not m:
        return [name]
    head, tail = name[: m.start()], name[m.end() :]
    out: list[str] = []
    for rng in m.group(1).split(","):
        lo, sep, hi = rng.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            return [name]
        width = len(lo)
        for n in range(int(lo), int(hi) + 1) if sep else (int(lo),):
            out.extend(_expand_one(f"{head}{n:0{width}d}{tail}"))
    return out


def _local_time(text: str | None) -> float | None:
    """scontrol's `2026-12-01T08:50:43` (the controller's local time) as unix seconds."""
    if not text:
        return None
    try:
        return time.mktime(time.strptime(text, "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return None


def _name_and_id(text: str | None) -> tuple[str | None, int | None]:
    """`root(0)` → ("root", 0); a user unknown to the controller prints `(4242)`."""
    if not text:
        return None, None
    m = re.fullmatch(r"([^()]*)\((\d+)\)", text)
    if not m:
        return text, None
    return (m.group(1) or None), int(m.group(2))


def parse_scontrol_jobs(text: str) -> list[SlurmJob]:
    """Every job block of `scontrol show job -d` (one job or all); blocks start at `JobId=`."""
    jobs: list[SlurmJob] = []
    blocks = re.split(r"(?m)^(?=JobId=)", text)
    for block in blocks:
        if not block.startswith("JobId="):
            continue
        fields: dict[str, str] = {}
        details: list[JobNodes] = []
        for line in block.splitlines():
            stripped = line.strip()
            if stripped.startswith("Nodes=") and "GRES=" in stripped:
                pairs = dict(_PAIR.findall(stripped))
                details.append(
                    JobNodes(
                        expand_hostlist(pairs.get("Nodes", "")), parse_gres_detail(pairs.get("GRES", ""))
                    )
                )
                continue
            for key, value in _PAIR.findall(stripped):
                fields.setdefault(key, value)
        user, uid = _name_and_id(fields.get("UserId"))
        partition = fields.get("Partition") or None
        jobs.append(
            SlurmJob(
                job_id=fields["JobId"],
                state=fields.get("JobState"),
                user=user,
                uid=uid,
                partition=partition if partition != "(null)" else None,
                start_time=_local_time(fields.get("StartTime")),
                array_job_id=fields.get("ArrayJobId"),
                details=tuple(details),
            )
        )
    return jobs


def parse_gres_conf(text: str, node: str) -> dict[str, list[str]]:
    """The device files gres.conf gives `node`, per GRES name, in the order Slurm numbers them (the
    GRES index is the position in this list). Lines with a `NodeName=` apply only to the nodes it
    names; `File=/dev/nvidia[0-3]` is a hostlist-style range. Lines without `File=` add nothing."""
    out: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        pairs = {k.lower(): v for k, v in re.findall(r"(\w+)=(\S+)", line)}
        if "nodename" in pairs and node not in expand_hostlist(pairs["nodename"]):
            continue
        name = pairs.get("name")
        if not name:
            continue
        if "file" in pairs:
            out.setdefault(name, []).extend(expand_hostlist(pairs["file"]))
        elif "multiplefiles" in pairs:
            # One GRES (a MIG instance) bound to several files: the parent GPU's and its caps.
            out.setdefault(name, []).append(",".join(expand_hostlist(pairs["multiplefiles"])))
    return out


def device_of_file(path: str) -> tuple[str, int] | None:
    """`/dev/nvidia3` → ("nvidia", 3), `/dev/davinci5` → ("ascend", 5): the device's minor number.
    A MultipleFiles entry (comma-joined) names its first such file: a MIG instance's parent GPU."""
    for one in path.split(","):
        m = _DEVICE_FILE.search(one.strip())
        if m:
            return _VENDOR_OF_FILE[m.group(1)], int(m.group(2))
    return None


def parse_jobstats_file(text: str) -> tuple[str, int | None] | None:
    """A jobstats prolog file (`<job id> <uid>`): (job id, uid); None when it is not one."""
    fields = text.split()
    if not fields or not fields[0].isdigit():
        return None
    uid = int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else None
    return fields[0], uid
