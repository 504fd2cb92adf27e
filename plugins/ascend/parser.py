"""Pure parser for `npu-smi info` (the default table): text in, records out, never raises.

The table is read by its structure: cells between `|`, the two rows each chip prints, and the
`+---`/`+===` separators. Column offsets are never used, because widths vary between npu-smi
versions (80 to 116 columns) and five-digit values touch the slash (`41052/ 65536`). Inside a cell,
values are matched to the header words of the same cell, in order.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

# A value the output does not give.
_ABSENT = frozenset({"", "NA", "N/A", "-", "--"})

_BORDER = re.compile(r"^\+[-=+]*\+?$")
# One value of a cell: a `used / total` pair (spaces optional on either side) or one word.
_VALUE = re.compile(r"[^\s/|]+\s*/\s*[^\s/|]+|\S+")
# Header words are separated by two or more spaces, or by a space after a `(unit)`.
_HEADER_SPLIT = re.compile(r"\s{2,}|(?<=\))\s+")
_NO_PROCESSES = re.compile(r"No running processes found in NPU\s+(\d+)", re.IGNORECASE)
_VERSION = re.compile(r"Version:\s*(\S+)")

# Normalised header word -> attribute of the row being read.
_DEVICE_COLUMNS = {
    "npu": "npu_id",
    # Ascend 950 (Atlas 350): one row pair per NPU, headed `NPU ID`, no chip column.
    "npuid": "npu_id",
    "name": "name",
    "chip": "chip_id",
    "chipid": "chip_id",
    "device": "logic_id",
    "phyid": "phy_id",
    "health": "health",
    "busid": "bus_id",
    "powerw": "power_w",
    "tempc": "temp_c",
    "hugepagesusagepage": "hugepages",
    "aicore": "aicore_pct",
    "npuutil": "npu_util_pct",
    "memoryusagemb": "memory",
    "hbmusagemb": "hbm",
}
_PROCESS_COLUMNS = {
    "npu": "npu_id",
    "npuid": "npu_id",
    "chip": "chip_id",
    "chipid": "chip_id",
    "processid": "pid",
    "processname": "name",
    "processmemorymb": "memory_mb",
    "processidincontainer": "container_pid",
}
_KNOWN = frozenset(_DEVICE_COLUMNS) | frozenset(_PROCESS_COLUMNS)


@dataclass(frozen=True, slots=True)
class NpuChip:
    """One chip of one NPU, as the two rows of the default table show it. `None` where not given."""

    npu_id: int
    chip_id: int
    name: str | None = None
    health: str | None = None
    power_w: float | None = None
    temp_c: float | None = None
    aicore_pct: float | None = None
    hbm_used_mb: int | None = None
    hbm_total_mb: int | None = None
    # DDR ("Memory-Usage(MB)"): the only memory on 310/310P/310B; `0 / 0` on 910B.
    memory_used_mb: int | None = None
    memory_total_mb: int | None = None
    bus_id: str | None = None
    # The "Device" column of 310-class tables (the chip's logic id).
    logic_id: int | None = None
    phy_id: int | None = None
    npu_util_pct: float | None = None
    hugepages_used: int | None = None
    hugepages_total: int | None = None
    # False when the header was not understood and the NPU id is the numbered first cell of its
    # row pair: the other values are only those whose columns were recognised.
    understood: bool = True
    # False when the table prints no chip id (Ascend 950: one row pair per NPU, or a layout read by
    # position): `chip_id` is then the chip's position within its NPU, 0 for the first.
    chip_id_printed: bool = True


@dataclass(frozen=True, slots=True)
class NpuProcess:
    """One row of the process table."""

    npu_id: int
    chip_id: int
    pid: int | None = None
    name: str | None = None
    memory_mb: int | None = None
    container_pid: int | None = None


@dataclass(frozen=True, slots=True)
class NpuSmiInfo:
    """What one `npu-smi info` printed."""

    chips: tuple[NpuChip, ...] = ()
    processes: tuple[NpuProcess, ...] = ()
    # False when the output has no process table: process counts are then unknown, not 0.
    processes_known: bool = False
    # NPUs the process table speaks about (rows or "No running processes found in NPU <id>").
    npus_in_process_table: frozenset[int] = frozenset()
    version: str | None = None
    # Lines outside the table: library log lines before it, `[WARNING]…` after it, error messages.
    messages: tuple[str, ...] = ()
    # Things the parser did not understand, for people.
    warnings: tuple[str, ...] = ()

    def chip_processes(self, npu_id: int, chip_id: int) -> tuple[NpuProcess, ...] | None:
        """The process rows of one chip; `None` when the table is absent or says nothing about this NPU."""
        if not self.processes_known or npu_id not in self.npus_in_process_table:
            return None
        return tuple(p for p in self.processes if p.npu_id == npu_id and p.chip_id == chip_id)

    def process_count(self, npu_id: int, chip_id: int) -> int | None:
        """Processes on one chip; `None` when the table is absent or says nothing about this NPU."""
        rows = self.chip_processes(npu_id, chip_id)
        return None if rows is None else len(rows)


@functools.lru_cache(maxsize=256)
def _key(header: str) -> str:
    return re.sub(r"[^a-z0-9]", "", header.lower())


@functools.lru_cache(maxsize=256)
def _split_header(cell: str) -> tuple[str, ...]:
    names: list[str] = []
    for name in _HEADER_SPLIT.split(cell.strip()):
        words = name.split()
        # `NPU Chip` (one space) heads two columns in some process tables; `NPU ID` is one.
        if len(words) > 1 and _key(name) not in _KNOWN and all(_key(w) in _KNOWN for w in words):
            names.extend(words)
        elif name:
            names.append(name)
    return tuple(names)


def _int(text: str | None) -> int | None:
    if text is None or text.strip() in _ABSENT:
        return None
    try:
        return int(text.strip())
    except ValueError:
        number = _float(text)
        return int(number) if number is not None and number.is_integer() else None


def _float(text: str | None) -> float | None:
    if text is None or text.strip() in _ABSENT:
        return None
    try:
        return float(text.strip())
    except ValueError:
        return None


def _pair(text: str | None) -> tuple[int | None, int | None]:
    if text is None or "/" not in text:
        return None, None
    used, _, total = text.partition("/")
    return _int(used), _int(total)


class _Reader:
    """Collects warnings (deduplicated, in order) while the table is read."""

    def __init__(self) -> None:
        self.warnings: list[str] = []

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)

    def cells(self, headers: list[str], row: list[str], columns: dict[str, str]) -> dict[str, str | None]:
        """Match each cell's values to the same cell's header words."""
        out: dict[str, str | None] = {}
        if len(row) != len(headers):
            self.warn(f"row has {len(row)} cells where the header has {len(headers)}: {'|'.join(row)!r}")
        for header_cell, value_cell in zip(headers, row, strict=False):
            names = _split_header(header_cell)
            values = _VALUE.findall(value_cell) if len(names) > 1 else [value_cell.strip()]
            if len(values) > len(names) and names:
                if _key(names[-1]) in ("name", "processname"):
                    values = [*values[: len(names) - 1], " ".join(values[len(names) - 1 :])]
                else:
                    self.warn(
                        f"more values than columns in {value_cell.strip()!r} under {header_cell.strip()!r}"
                    )
            elif len(values) == 1 < len(names) and _key(names[-1]) == "name" and _int(values[0]) is None:
                # Only a name: the NPU id is left out (a second chip of one NPU); keep the name a name.
                values = [""] * (len(names) - 1) + values
            elif len(values) == 1 and [columns.get(_key(n)) for n in names] == ["npu_id", "chip_id"]:
                values = [values[0], ""]  # one id under `NPU Chip`: the NPU's, its only chip
            elif len(values) < len(names) and any(v.strip() for v in values):
                self.warn(
                    f"fewer values than columns in {value_cell.strip()!r} under {header_cell.strip()!r}"
                )
            for name, value in zip(names, values, strict=False):
                attr = columns.get(_key(name))
                if attr is None:
                    self.warn(f"unknown column {name!r} ignored")
                    continue
                out[attr] = value.strip()
        return out


def _row_cells(line: str) -> list[str]:
    inner = line[1:-1] if line.endswith("|") and len(line) > 1 else line[1:]
    return inner.split("|")


def _has_column(rows: list[list[str]], attr: str, columns: dict[str, str]) -> bool:
    return any(columns.get(_key(n)) == attr for row in rows for cell in row for n in _split_header(cell))


def _first_number(cell: str | None) -> int | None:
    words = (cell or "").split()
    return int(words[0]) if words and words[0].isdigit() else None


def _chip(
    reader: _Reader,
    first: dict[str, str | None],
    second: dict[str, str | None],
    understood: bool = True,
    chip_id_printed: bool = True,
) -> NpuChip | None:
    values = {**first, **second}
    npu_id, chip_id = _int(values.get("npu_id")), _int(values.get("chip_id"))
    if npu_id is None or chip_id is None:
        return None
    hbm_used, hbm_total = _pair(values.get("hbm"))
    ddr_used, ddr_total = _pair(values.get("memory"))
    huge_used, huge_total = _pair(values.get("hugepages"))
    for attr in ("hbm", "memory"):
        text = values.get(attr)
        if text is not None and text not in _ABSENT and "/" not in text:
            reader.warn(f"memory value {text!r} is not 'used / total'")
    return NpuChip(
        npu_id=npu_id,
        chip_id=chip_id,
        name=values.get("name") or None,
        health=values.get("health") or None,
        power_w=_float(values.get("power_w")),
        temp_c=_float(values.get("temp_c")),
        aicore_pct=_float(values.get("aicore_pct")),
        hbm_used_mb=hbm_used,
        hbm_total_mb=hbm_total,
        memory_used_mb=ddr_used,
        memory_total_mb=ddr_total,
        bus_id=None if (values.get("bus_id") or "") in _ABSENT else values.get("bus_id"),
        logic_id=_int(values.get("logic_id")),
        phy_id=_int(values.get("phy_id")),
        npu_util_pct=_float(values.get("npu_util_pct")),
        hugepages_used=huge_used,
        hugepages_total=huge_total,
        understood=understood,
        chip_id_printed=chip_id_printed,
    )


def parse_npu_smi_info(text: str) -> NpuSmiInfo:
    """Parse the default `npu-smi info` table. Never raises: what is not understood lands in `.warnings`."""
    reader = _Reader()
    messages: list[str] = []
    chips: list[NpuChip] = []
    processes: list[NpuProcess] = []
    npus_in_process_table: set[int] = set()
    seen_chips: set[tuple[int, int]] = set()
    version: str | None = None
    device_header: list[list[str]] = []
    process_header: list[str] | None = None
    section = "title"  # title -> device_header -> devices -> processes
    block: list[list[str]] = []  # device rows since the last separator
    npu_of_group: int | None = None  # NPU id of the chips since the last `+===`
    has_chip_column = True
    process_has_chip = True

    def by_structure(
        first: list[str], second: list[str], row1: dict[str, str | None], row2: dict[str, str | None]
    ) -> NpuChip | None:
        """A row pair whose ids were not understood: the NPU id is its numbered first cell."""
        npu_id = _first_number(first[0] if first else None)
        if npu_id is None:
            reader.warn(f"chip rows without an NPU id and chip id skipped: {'|'.join(first)!r}")
            return None
        chip_id = _first_number(second[0] if second else None)
        printed = chip_id is not None and (npu_id, chip_id) not in seen_chips
        if not printed:
            chip_id = sum(1 for n, _ in seen_chips if n == npu_id)
        header = (device_header[0][0] if device_header and device_header[0] else "").strip()
        reader.warn(f"NPU {npu_id} read by the position of its rows: header {header!r} not understood")
        return _chip(
            reader,
            {**row1, "npu_id": str(npu_id)},
            {**row2, "chip_id": str(chip_id)},
            understood=False,
            chip_id_printed=printed,
        )

    def flush_block() -> None:
        nonlocal npu_of_group
        if not block:
            return
        if len(block) % 2:
            reader.warn(f"a chip block has {len(block)} rows instead of 2: {'|'.join(block[-1])!r}")
        for first, second in zip(block[0::2], block[1::2], strict=False):
            row1 = reader.cells(device_header[0], first, _DEVICE_COLUMNS)
            row2 = reader.cells(device_header[1], second, _DEVICE_COLUMNS)
            if _int(row1.get("npu_id")) is None and npu_of_group is not None:
                row1["npu_id"] = str(npu_of_group)  # a second chip of the same NPU may leave the id out
            if not has_chip_column and _int(row1.get("npu_id")) is not None:
                row2["chip_id"] = "0"  # one row pair per NPU (Ascend 950): its only chip
            chip = _chip(reader, row1, row2, chip_id_printed=has_chip_column)
            if chip is None:
                chip = by_structure(first, second, row1, row2)
            if chip is None:
                continue
            if (chip.npu_id, chip.chip_id) in seen_chips:
                reader.warn(f"NPU {chip.npu_id} chip {chip.chip_id} listed twice; the first kept")
                continue
            seen_chips.add((chip.npu_id, chip.chip_id))
            chips.append(chip)
            npu_of_group = chip.npu_id
        block.clear()

    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if _BORDER.match(line):
            if section == "devices":
                flush_block()
                if "=" in line:
                    npu_of_group = None
            elif section == "device_header" and len(device_header) == 2:
                section = "devices"
            continue
        if not line.startswith("|"):
            messages.append(line)
            continue
        cells = _row_cells(line)
        first_words = cells[0].split()
        is_process_header = any(_key(c).startswith("process") for c in cells[1:]) and bool(first_words)
        if is_process_header and section != "title":
            if section == "devices":
                flush_block()
            process_header = cells
            process_has_chip = _has_column([cells], "chip_id", _PROCESS_COLUMNS)
            section = "processes"
            continue
        if section == "title":
            if first_words and first_words[0].upper() == "NPU":
                device_header = [cells]
                section = "device_header"
            elif version is None and (match := _VERSION.search(line)):
                version = match.group(1)
            elif len(cells) > 1 and any(c.strip() for c in cells):
                # A table the parser has not seen: its NPUs are still found by their rows' structure.
                reader.warn(f"device table header {cells[0].strip()!r} not understood")
                device_header = [cells]
                section = "device_header"
            else:
                reader.warn(f"row before the device table not understood: {line!r}")
            continue
        if section == "device_header":
            if len(device_header) == 1:
                device_header.append(cells)
                has_chip_column = _has_column(device_header, "chip_id", _DEVICE_COLUMNS)
            else:
                # No separator after the header: take the row as data anyway.
                section = "devices"
                block.append(cells)
            continue
        if section == "devices":
            block.append(cells)
            continue
        # section == "processes"
        joined = " ".join(c.strip() for c in cells)
        if match := _NO_PROCESSES.search(joined):
            npus_in_process_table.add(int(match.group(1)))
            continue
        row = reader.cells(process_header or [], cells, _PROCESS_COLUMNS)
        npu_id, chip_id = _int(row.get("npu_id")), _int(row.get("chip_id"))
        if npu_id is not None and chip_id is None and (not process_has_chip or not row.get("chip_id")):
            chip_id = 0  # a table without chip ids (Ascend 950) or one id under `NPU Chip`
        if npu_id is None or chip_id is None:
            reader.warn(f"process row not understood: {line!r}")
            continue
        npus_in_process_table.add(npu_id)
        processes.append(
            NpuProcess(
                npu_id=npu_id,
                chip_id=chip_id,
                pid=_int(row.get("pid")),
                name=row.get("name") or None,
                memory_mb=_int(row.get("memory_mb")),
                container_pid=_int(row.get("container_pid")),
            )
        )
    if section == "devices":
        flush_block()

    if not device_header:
        reader.warn("no npu-smi info device table (a header row starting with 'NPU') found")
    elif not chips:
        reader.warn("the npu-smi info device table lists no chips")
    return NpuSmiInfo(
        chips=tuple(chips),
        processes=tuple(processes),
        processes_known=process_header is not None,
        npus_in_process_table=frozenset(npus_in_process_table),
        version=version,
        messages=tuple(messages),
        warnings=tuple(reader.warnings),
    )


# `npu-smi info -m` header words -> attribute of the row being read. The last column, `Chip Name`,
# may hold spaces (`Ascend 910B3`); every other cell is one word.
_MAPPING_COLUMNS = {
    "npuid": "npu_id",
    "slotid": "slot_id",
    "chipid": "chip_id",
    "chiplogicid": "logic_id",
    "chipphyid": "phy_id",
    "chipname": "name",
}


@dataclass(frozen=True, slots=True)
class NpuChipMapping:
    """One row of `npu-smi info -m`: which logic and physical id a chip of an NPU has. `None` where not printed."""

    npu_id: int
    chip_id: int
    logic_id: int | None = None
    # The N of /dev/davinciN, what Huawei's device plugin names the chip by (`Ascend910-<phy id>`).
    phy_id: int | None = None
    slot_id: int | None = None
    name: str | None = None

    @property
    def is_mcu(self) -> bool:
        """The board's management controller (`Mcu`, logic id `-`): listed by `-m`, not a compute chip."""
        return (self.name or "").strip().lower() == "mcu"


@dataclass(frozen=True, slots=True)
class NpuSmiMapping:
    """What one `npu-smi info -m` printed."""

    rows: tuple[NpuChipMapping, ...] = ()
    # Things the parser did not understand, for people.
    warnings: tuple[str, ...] = ()

    @property
    def chips(self) -> tuple[NpuChipMapping, ...]:
        """The compute chips, without the MCU rows."""
        return tuple(r for r in self.rows if not r.is_mcu)

    def chip(self, npu_id: int, chip_id: int) -> NpuChipMapping | None:
        return next((r for r in self.chips if r.npu_id == npu_id and r.chip_id == chip_id), None)

    def chips_of(self, npu_id: int) -> tuple[NpuChipMapping, ...]:
        """One NPU's compute chips, in the order printed."""
        return tuple(r for r in self.chips if r.npu_id == npu_id)


def parse_npu_smi_mapping(text: str) -> NpuSmiMapping:
    """Parse `npu-smi info -m` (NPU ID, [Slot ID,] Chip ID, Chip Logic ID or Chip Phy-ID, Chip Name).

    Columns are found by their header words, in the order printed, so the Ascend 950 layout (with
    `Slot ID` and `Chip Phy-ID`, no logic id) reads like the older one. Never raises.
    """
    reader = _Reader()
    attrs: list[str] | None = None
    rows: list[NpuChipMapping] = []
    seen: set[tuple[int, int]] = set()
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if attrs is None:
            names = [n for n in re.split(r"\s{2,}|\t", line) if n.strip()]
            keys = [_key(n) for n in names]
            if "npuid" not in keys or "chipid" not in keys:
                continue  # a library log line before the table
            attrs = []
            for name, key in zip(names, keys, strict=True):
                attr = _MAPPING_COLUMNS.get(key)
                if attr is None:
                    reader.warn(f"unknown column {name.strip()!r} in npu-smi info -m read by its position")
                attrs.append(attr or "")
            if attrs[-1] != "name":
                reader.warn("npu-smi info -m does not end with 'Chip Name'")
            continue
        words = line.split()
        if len(words) < len(attrs) - 1 or not words[0].isdigit():
            reader.warn(f"npu-smi info -m row not understood: {line!r}")
            continue
        values = dict(zip(attrs[:-1], words[: len(attrs) - 1], strict=True))
        values[attrs[-1]] = " ".join(words[len(attrs) - 1 :])
        npu_id, chip_id = _int(values.get("npu_id")), _int(values.get("chip_id"))
        if npu_id is None or chip_id is None:
            reader.warn(f"npu-smi info -m row not understood: {line!r}")
            continue
        if (npu_id, chip_id) in seen:
            reader.warn(f"npu-smi info -m lists NPU {npu_id} chip {chip_id} twice; the first kept")
            continue
        seen.add((npu_id, chip_id))
        rows.append(
            NpuChipMapping(
                npu_id=npu_id,
                chip_id=chip_id,
                logic_id=_int(values.get("logic_id")),
                phy_id=_int(values.get("phy_id")),
                slot_id=_int(values.get("slot_id")),
                name=values.get("name") or None,
            )
        )
    if attrs is None:
        reader.warn("no npu-smi info -m table (a header with 'NPU ID' and 'Chip ID') found")
    elif not rows:
        reader.warn("the npu-smi info -m table lists no chips")
    return NpuSmiMapping(rows=tuple(rows), warnings=tuple(reader.warnings))
