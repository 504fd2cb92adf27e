"""Pure parser for the `Key : value` outputs of `npu-smi info -t <type> -i <id>`: text in, records out.

Such an output is one block of NPU keys (`NPU ID`, `Chip Count`), then one block per chip separated
by blank lines; a chip block names its chip with a `Chip ID` line, which 25.x prints *after* the
chip's keys and older versions before them. Ascend 950 prints no chip blocks and no `Chip ID` at
all: its keys describe the NPU's only chip. Blocks of other parts (`Chip Name : MCU`) have no chip id
and are not a chip's.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

_LINE = re.compile(r"^\s*([^:]+?)\s*:\s?(.*?)\s*$")
_ABSENT = frozenset({"", "NA", "N/A", "-", "--"})

# `-t usages` key (normalised) -> the extra field it becomes (percent, 0-100).
USAGE_FIELDS = {
    "aicoreusagerate": "aicore_pct",
    "aivectorusagerate": "aivector_pct",
    # 310P prints the vector unit as "Vectorcore".
    "vectorcoreusagerate": "aivector_pct",
    "aicubeusagerate": "aicube_pct",
    "aicpuusagerate": "aicpu_pct",
    "ctrlcpuusagerate": "ctrlcpu_pct",
    "hbmbandwidthusagerate": "hbm_bw_pct",
    "ddrbandwidthusagerate": "ddr_bw_pct",
    "npuutilization": "npu_util_pct",
}
# `-t board` key (normalised) -> the info field it becomes.
BOARD_FIELDS = {
    "serialnumber": "serial",
    "productname": "product",
    "softwareversion": "driver",
    "firmwareversion": "firmware",
    "boardid": "board_id",
    "chipname": "chip_name",
}


def _key(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


@dataclass(frozen=True, slots=True)
class NpuSmiFields:
    """One `-t` output: the NPU's own keys and each chip's, keys normalised (`aicoreusagerate`)."""

    npu_id: int | None = None
    npu: Mapping[str, str] = field(default_factory=dict)
    chips: Mapping[int, Mapping[str, str]] = field(default_factory=dict)
    # Lines that are not `Key : value` (errors such as "This device does not support querying …").
    messages: tuple[str, ...] = ()

    def for_chip(self, chip_id: int) -> dict[str, str]:
        """The chip's keys over the NPU's; an output without chip blocks describes every chip alike."""
        if not self.chips:
            return dict(self.npu)
        return {**self.npu, **self.chips.get(chip_id, {})}


def parse_npu_smi_fields(text: str) -> NpuSmiFields:
    """Parse a `npu-smi info -t <type>` output. Never raises; values `NA`/`-` are left out."""
    blocks: list[dict[str, str]] = [{}]
    messages: list[str] = []
    for raw in text.splitlines():
        if not raw.strip():
            if blocks[-1]:
                blocks.append({})
            continue
        match = _LINE.match(raw)
        if match is None:
            messages.append(raw.strip())
            continue
        key, value = _key(match.group(1)), match.group(2)
        if key and value not in _ABSENT:
            blocks[-1].setdefault(key, value)
    blocks = [b for b in blocks if b]
    npu: dict[str, str] = {}
    chips: dict[int, dict[str, str]] = {}
    for position, block in enumerate(blocks):
        chip_id = _int(block.get("chipid"))
        if chip_id is not None:
            chips.setdefault(chip_id, block)
        elif position == 0:
            npu = block
    npu_id = _int(npu.get("npuid"))
    if npu_id is None:
        npu_id = next((n for b in chips.values() if (n := _int(b.get("npuid"))) is not None), None)
    return NpuSmiFields(npu_id=npu_id, npu=npu, chips=chips, messages=tuple(messages))


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def number(text: str | None) -> float | None:
    """A finite number, or None."""
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if value == value and abs(value) != float("inf") else None


def usages(fields: NpuSmiFields, chip_id: int) -> dict[str, float]:
    """The usage rates of one chip as extra fields (`aicore_pct`, `hbm_bw_pct`, …)."""
    out: dict[str, float] = {}
    for key, value in fields.for_chip(chip_id).items():
        name = USAGE_FIELDS.get(key)
        if name is not None and name not in out and (v := number(value)) is not None and 0 <= v <= 100:
            out[name] = v
    return out


def board(fields: NpuSmiFields, chip_id: int) -> dict[str, str]:
    """Identity of one chip as info fields (`serial`, `product`, `firmware`, `driver`, …)."""
    values = fields.for_chip(chip_id)
    return {name: values[key][:256] for key, name in BOARD_FIELDS.items() if key in values}


@dataclass(frozen=True, slots=True)
class NpuHealth:
    """What `-t health` says about one chip."""

    health: str | None = None
    error_code: str | None = None
    error_text: str | None = None

    def reason(self) -> str | None:
        """`0x80E18402: HBM ECC …` for people; None when npu-smi names no error."""
        parts = [p for p in (self.error_code, self.error_text) if p]
        return ": ".join(parts) if parts else None


def health(fields: NpuSmiFields, chip_id: int) -> NpuHealth:
    values = fields.for_chip(chip_id)
    return NpuHealth(
        health=values.get("health") or values.get("healthstatus"),
        error_code=values.get("errorcode"),
        error_text=values.get("errorinformation"),
    )
