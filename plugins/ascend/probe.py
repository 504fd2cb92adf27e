"""Huawei Ascend NPUs through one `npu-smi info` per tick (README.md in this folder)."""

from __future__ import annotations

import logging
import math
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from capmon.agent import CommandRunner, DeviceSample, Probe, ProbeConfig, ProbeUnavailable, run_command
from capmon.agent.probe import Holder
from capmon.plugins.ascend.fields import NpuSmiFields, board, health, parse_npu_smi_fields, usages
from capmon.plugins.ascend.parser import (
    NpuChip,
    NpuChipMapping,
    NpuProcess,
    NpuSmiInfo,
    NpuSmiMapping,
    parse_npu_smi_info,
    parse_npu_smi_mapping,
)

log = logging.getLogger(__name__)

_MIB = 1024 * 1024
# npu-smi is killed at this share of the probe's timeout, so the probe (not the agent) reports it.
_COMMAND_SHARE_OF_TIMEOUT = 0.8
_RET = re.compile(r"ret is (-?\d+)")
_UNKNOWN_COLUMN = re.compile(r"unknown column (.+) ignored$")
# dcmi return codes people meet most, with what to do about them.
_HINTS = {
    "-8005": "no access to the NPU driver: run the agent as root or as a user in group HwHiAiUser",
    "-8020": "the NPUs are held by another container",
}
PLACEHOLDER_DEVICE_ID = "npu-smi"
# A vector unit or HBM bandwidth this busy, with AI Core idle, is a working chip (vector-only or
# memory-bound kernels). Idle chips show a few % of HBM bandwidth from the driver (3 % in the
# Ascend 950 doc); DDR bandwidth is not used: an idle 310P shows 51 %.
ACTIVE_PCT = 10.0
# An extra call (`-t usages`/`-t health`/`-t board`) is not started with less time than this left.
_MIN_EXTRA_CALL_S = 0.5


@dataclass(frozen=True, slots=True)
class AscendConfig(ProbeConfig):
    """Options of the ascend probe (`[probes.ascend]`)."""

    # The npu-smi binary: a name looked up on PATH, or an absolute path.
    npu_smi: str = "npu-smi"
    # npu-smi Health `Warning` is a minor alarm and the chip still computes, so by default it stays
    # available (the health shows in `info`); set true to report Warning chips unavailable.
    warning_is_unhealthy: bool = False
    # Each NPU's `npu-smi info -t usages -i N` (AI Core, vector, AI CPU, control CPU, HBM/DDR
    # bandwidth rates) is read again within this many seconds, one NPU per tick, so the extra cost
    # is at most one short call per tick whatever the NPU count; 0 turns these reads off.
    usages_interval_s: float = 60.0
    # `npu-smi info -m` (each chip's logic id and physical id, which schedulers name chips by) is
    # read at setup and again every this many seconds, as one of the per-tick extra calls; 0 reads
    # it at setup only.
    mapping_interval_s: float = 600.0

    def __post_init__(self) -> None:
        for name in ("usages_interval_s", "mapping_interval_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 <= value < math.inf):
                raise ValueError(f"{name} must be 0 (off) or a number of seconds, got {value!r}")


class AscendProbe(Probe):
    """Every chip of every NPU, from the default `npu-smi info` table (one call per tick)."""

    name: ClassVar[str] = "ascend"
    vendor: ClassVar[str] = "ascend"
    Config: ClassVar[type[ProbeConfig]] = AscendConfig
    default_interval_s: ClassVar[float] = 10.0
    default_timeout_s: ClassVar[float] = 10.0
    config: AscendConfig

    def __init__(
        self,
        config: AscendConfig | None = None,
        run: CommandRunner | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(config)
        self._run: CommandRunner = run if run is not None else run_command
        self._clock = clock
        # Per NPU: `-t board` read once (None when it failed), `-t usages` (read time, fields) and
        # the last attempt, `-t health` keyed by the table's health values it explains.
        self._identity: dict[int, NpuSmiFields | None] = {}
        self._usages: dict[int, tuple[float, NpuSmiFields]] = {}
        self._usages_tried: dict[int, float] = {}
        self._health: dict[int, tuple[tuple[str | None, ...], NpuSmiFields | None]] = {}
        self._extra_paused_until = -math.inf
        self._check_path = run is None
        self._npu_smi = self.config.npu_smi
        # Chips of the last good parse: reported unavailable when npu-smi fails.
        self._known: list[NpuChip] = []
        self._logged: set[str] = set()
        # The failure logged last; cleared by a good reading, so the next outage is logged again.
        self._failure: str | None = None
        # The last `npu-smi info -m` that listed chips (kept when a later one fails), and when it was tried.
        self._mapping: NpuSmiMapping | None = None
        self._mapping_tried: float | None = None
        # (NPU id, table chip id) -> the chip id of its device id, fixed the first time it is reported.
        self._chip_ids: dict[tuple[int, int], int] = {}

    def setup(self) -> None:
        """Find npu-smi (an injected runner stands for the binary, so it is not looked up then) and
        read the chip mapping (`npu-smi info -m`), whose failure only leaves the ids unknown."""
        if self._check_path:
            found = shutil.which(self.config.npu_smi)
            if found is None:
                if self.config.npu_smi == "npu-smi":
                    raise ProbeUnavailable("npu-smi not on PATH")
                raise ProbeUnavailable(f"npu-smi not found at {self.config.npu_smi!r}")
            self._npu_smi = found
        self._read_mapping(self.timeout_s * _COMMAND_SHARE_OF_TIMEOUT)

    def sample(self) -> list[DeviceSample]:
        """Run `npu-smi info` once and turn each chip into a sample; failures become unavailable devices."""
        timeout = self.timeout_s * _COMMAND_SHARE_OF_TIMEOUT
        try:
            started = self._clock()
            code, out, err = self._run([self._npu_smi, "info"], timeout)
        except subprocess.TimeoutExpired:
            return self._unavailable(f"npu-smi info did not answer within {timeout:g} s")
        except OSError as exc:
            return self._unavailable(f"npu-smi info could not run: {exc}")
        if code != 0:
            return self._unavailable(_failure_message(code, out, err))
        try:
            info = parse_npu_smi_info(out)
        except Exception as exc:  # the parser never raises by design; a bug must still not stop the agent
            log.exception("ascend: npu-smi info parser failed")
            return self._unavailable(f"npu-smi info output not understood: {exc}")
        if not info.chips:
            reason = "npu-smi info printed no device table"
            # A short output is a message worth showing; a long one is some other layout.
            detail = _first_message(info.messages) if len(info.messages) <= 3 else None
            if detail:
                reason = _with_hint(f"{reason}: {detail}", detail)
            if reason != self._failure:
                log.warning("ascend: %s; output starts %r", reason, out[:200])
            return self._unavailable(reason, log_reason=False)
        if info.warnings:
            self._log_once(
                f"ascend: npu-smi info {info.version or ''} partly not understood: "
                + "; ".join(info.warnings)
            )
        if self._failure is not None:
            log.warning("ascend: npu-smi info readable again")
            self._failure = None
        self._known = list(info.chips)
        self._extra_call(info.chips, started)
        now = self._clock()
        return [self._device(chip, info, now) for chip in info.chips]

    def _extra_call(self, chips: tuple[NpuChip, ...], started: float) -> None:
        """At most one extra call per tick: a changed non-OK health first, then identity, then usages,
        and the chip mapping (`-m`) in a tick with nothing else due (at the latest one interval late)."""
        now = self._clock()
        left = self.timeout_s * _COMMAND_SHARE_OF_TIMEOUT - (now - started)
        if now < self._extra_paused_until or left < _MIN_EXTRA_CALL_S:
            return
        npus: dict[int, list[NpuChip]] = {}
        for chip in chips:
            npus.setdefault(chip.npu_id, []).append(chip)
        for npu, own in npus.items():
            key = tuple(c.health for c in own)
            if (
                any(h is not None and h.upper() != "OK" for h in key)
                and self._health.get(npu, ((),))[0] != key
            ):
                self._health[npu] = (key, self._read(["-t", "health", "-i", str(npu)], left))
                return
        for npu in npus:
            if npu not in self._identity:
                self._identity[npu] = self._read(["-t", "board", "-i", str(npu)], left)
                return
        every = self.config.mapping_interval_s
        since = math.inf if self._mapping_tried is None else now - self._mapping_tried
        mapping_due = since == math.inf or bool(every and since >= every)
        if mapping_due and (since == math.inf or since >= 2 * every):
            self._read_mapping(left)
            return
        interval = self.config.usages_interval_s
        due: list[int] = []
        if interval:
            if len(npus) * self.interval_s > interval:
                self._log_once(
                    f"ascend: {len(npus)} NPUs at one `-t usages` call per {self.interval_s:g} s tick are"
                    f" each read every {len(npus) * self.interval_s:g} s, more than usages_interval_s ="
                    f" {interval:g}"
                )
            # Due when waiting one more tick would overrun the interval; the longest-waiting NPU first.
            due = [
                n
                for n in npus
                if n not in self._usages_tried or now - self._usages_tried[n] + self.interval_s > interval
            ]
        if due:
            npu = min(due, key=lambda n: self._usages_tried.get(n, -math.inf))
            self._usages_tried[npu] = now
            fields = self._read(["-t", "usages", "-i", str(npu)], left)
            if fields is not None:
                self._usages[npu] = (now, fields)
        elif mapping_due:
            self._read_mapping(left)

    def _read(self, args: list[str], timeout: float) -> NpuSmiFields | None:
        """One `npu-smi info -t …` call; a failure is logged once and never touches the chips' state."""
        what = f"npu-smi info {' '.join(args)}"
        try:
            code, out, err = self._run([self._npu_smi, "info", *args], timeout)
        except subprocess.TimeoutExpired:
            # A hanging npu-smi must not eat every tick's budget: the extra calls rest a while.
            self._extra_paused_until = self._clock() + (self.config.usages_interval_s or 60.0)
            self._log_once(f"ascend: {what} did not answer within {timeout:g} s; extra reads paused")
            return None
        except OSError as exc:
            self._log_once(f"ascend: {what} could not run: {exc}")
            return None
        fields = parse_npu_smi_fields(out) if code == 0 else None
        if fields is None or not (fields.npu or fields.chips):
            self._log_once(f"ascend: {what} gave nothing readable: {_failure_message(code, out, err)[:300]}")
            return None
        return fields

    def _read_mapping(self, timeout: float) -> None:
        """One `npu-smi info -m`; a failure or a table not understood is logged once and keeps the last
        good mapping: it only ever adds ids, never changes a device's state."""
        self._mapping_tried = self._clock()
        what = "npu-smi info -m"
        try:
            code, out, err = self._run([self._npu_smi, "info", "-m"], timeout)
        except subprocess.TimeoutExpired:
            self._extra_paused_until = self._clock() + (self.config.usages_interval_s or 60.0)
            self._log_once(f"ascend: {what} did not answer within {timeout:g} s; extra reads paused")
            return
        except Exception as exc:  # -m only adds ids: nothing it does may fail setup or a tick
            self._log_once(f"ascend: {what} could not run: {exc}")
            return
        mapping = parse_npu_smi_mapping(out) if code == 0 else None
        if mapping is None or not mapping.chips:
            detail = (
                _failure_message(code, out, err)
                if code != 0
                else "; ".join(mapping.warnings if mapping else ())
            )
            self._log_once(
                f"ascend: {what} gave no chip mapping, logic and physical ids unknown: {detail[:300]}"
            )
            return
        if mapping.warnings:
            self._log_once(f"ascend: {what} partly not understood: " + "; ".join(mapping.warnings))
        self._mapping = mapping

    def _mapped(self, chip: NpuChip) -> NpuChipMapping | None:
        """The chip's row of the last good `-m`: by chip id, or where the table prints none (Ascend 950),
        the chip at that position of its NPU."""
        if self._mapping is None:
            return None
        if chip.chip_id_printed:
            return self._mapping.chip(chip.npu_id, chip.chip_id)
        own = self._mapping.chips_of(chip.npu_id)
        return own[chip.chip_id] if chip.chip_id < len(own) else None

    def _ids(self, chip: NpuChip) -> tuple[str, dict[str, str]]:
        """The chip's device id and the ids schedulers know it by: `logic_id`, `phy_id`, `slot_id`.

        `-m` first; the table's `Device` (logic id) or `Phy-ID` column where `-m` does not print one.
        The device id is fixed the first time the chip is reported, so it never changes under a device.
        """
        mapped = self._mapped(chip)
        key = (chip.npu_id, chip.chip_id)
        chip_id = self._chip_ids.get(key)
        if chip_id is None:
            chip_id = mapped.chip_id if mapped is not None and not chip.chip_id_printed else chip.chip_id
            self._chip_ids[key] = chip_id
        logic = mapped.logic_id if mapped is not None and mapped.logic_id is not None else chip.logic_id
        phy = mapped.phy_id if mapped is not None and mapped.phy_id is not None else chip.phy_id
        slot = mapped.slot_id if mapped is not None else None
        ids = {"logic_id": logic, "phy_id": phy, "slot_id": slot}
        return _device_id(chip.npu_id, chip_id), {k: str(v) for k, v in ids.items() if v is not None}

    def _device(self, chip: NpuChip, info: NpuSmiInfo, now: float) -> DeviceSample:
        healthy, error = self._health_of(chip.health)
        device_id, ids = self._ids(chip)
        if chip.hbm_total_mb:
            used, total = chip.hbm_used_mb, chip.hbm_total_mb
        elif chip.memory_total_mb:
            used, total = chip.memory_used_mb, chip.memory_total_mb
        else:
            used, total = None, None
        details: dict[str, str | None] = {
            "bus_id": chip.bus_id,
            "health": chip.health,
            "npu_smi_version": info.version,
            **ids,
        }
        identity = self._identity.get(chip.npu_id)
        if identity is not None:
            details.update(board(identity, chip.chip_id))
        read = self._health.get(chip.npu_id)
        if read is not None and read[1] is not None and chip.health and chip.health.upper() != "OK":
            reason = health(read[1], chip.chip_id).reason()
            if reason and error:
                error = f"{error} ({reason})"
            elif reason:
                details["health_error"] = reason[:256]
        holders = _holders(info.chip_processes(chip.npu_id, chip.chip_id))
        util = chip.aicore_pct if chip.aicore_pct is not None else chip.npu_util_pct
        extra: dict[str, float] = {}
        if chip.npu_id in self._usages:
            read_at, fields = self._usages[chip.npu_id]
            extra = usages(fields, chip.chip_id)
            age = max(0.0, now - read_at)
            extra["usages_age_s"] = round(age, 3)
            util = _working_util(util, extra, age, self._usages_period(len({c.npu_id for c in info.chips})))
        if not chip.understood and (chip.health is None or util is None):
            healthy = False
            error = _layout_reason(info.warnings)
        return DeviceSample(
            device_id=device_id,
            vendor=self.vendor,
            model=chip.name,
            index=chip.npu_id,
            util_pct=util,
            memory_used_bytes=None if used is None else used * _MIB,
            memory_total_bytes=None if total is None else total * _MIB,
            power_w=chip.power_w,
            temp_c=chip.temp_c,
            processes=len(holders) if holders is not None else info.process_count(chip.npu_id, chip.chip_id),
            healthy=healthy,
            error=error,
            extra=extra,
            info={k: v for k, v in details.items() if v is not None},
            holders=holders,
        )

    def _usages_period(self, npus: int) -> float:
        """How long one round of `-t usages` reads takes: the interval, or longer with many NPUs."""
        return max(self.config.usages_interval_s, npus * self.interval_s)

    def _health_of(self, health: str | None) -> tuple[bool, str | None]:
        if health is None:
            return False, "npu-smi reports no health for this chip"
        if health.upper() == "OK":
            return True, None
        if health.lower() == "warning" and not self.config.warning_is_unhealthy:
            return True, None
        return False, f"npu-smi health: {health}"

    def _unavailable(self, reason: str, log_reason: bool = True) -> list[DeviceSample]:
        if log_reason and reason != self._failure:
            log.warning("ascend: %s", reason)
        self._failure = reason
        if not self._known:
            return [
                DeviceSample(device_id=PLACEHOLDER_DEVICE_ID, vendor=self.vendor, healthy=False, error=reason)
            ]
        out = []
        for chip in self._known:
            # The ids stay, so a scheduler's allocation still finds the chip it cannot read.
            device_id, ids = self._ids(chip)
            out.append(
                DeviceSample(
                    device_id=device_id,
                    vendor=self.vendor,
                    model=chip.name,
                    index=chip.npu_id,
                    healthy=False,
                    error=reason,
                    info=ids,
                )
            )
        return out

    def _log_once(self, message: str) -> None:
        if message not in self._logged:
            self._logged.add(message)
            log.warning("%s", message)


def _working_util(util: float | None, extra: dict[str, float], age_s: float, period_s: float) -> float | None:
    """AI Core reads idle but the last `-t usages` of this NPU saw vector or HBM traffic: it is working.

    Applies only while that reading is at most one round of reads old, and only when the reading's
    own AI Core was idle too (a cube workload that has since stopped is idle, not vector work).
    """
    if util is None or util >= ACTIVE_PCT or age_s > period_s or extra.get("aicore_pct", 0.0) >= ACTIVE_PCT:
        return util
    activity = max(extra.get("aivector_pct", 0.0), extra.get("hbm_bw_pct", 0.0))
    return activity if activity >= ACTIVE_PCT else util


def _holders(rows: tuple[NpuProcess, ...] | None) -> tuple[Holder, ...] | None:
    """The chip's process rows as holders, one per PID (memory MB → bytes, an empty name unknown).

    `None` when the table says nothing about the chip, or a row has no readable PID: the count
    still stands, but a holder list missing a process would pass for the whole truth.
    """
    if rows is None:
        return None
    holders: dict[int, Holder] = {}
    for row in rows:
        if row.pid is None:
            return None
        memory = None if row.memory_mb is None else row.memory_mb * _MIB
        seen = holders.get(row.pid)
        if seen is not None:
            # One PID on two rows of a chip (two contexts): one holder with the memory of both.
            memory = None if memory is None or seen.memory_bytes is None else memory + seen.memory_bytes
        name = row.name or (seen.name if seen is not None else None)
        holders[row.pid] = Holder(pid=row.pid, memory_bytes=memory, name=name)
    return tuple(holders.values())


def _layout_reason(warnings: tuple[str, ...]) -> str:
    """`npu-smi info layout not understood: header 'Card' …; unknown columns 'Card', 'Load(%)'`."""
    header = next((w for w in warnings if "header" in w), "header not understood")
    unknown = [m.group(1) for w in warnings if (m := _UNKNOWN_COLUMN.match(w))]
    reason = f"npu-smi info layout not understood: {header}"
    if unknown:
        reason += f"; unknown columns {', '.join(unknown)}"
    return reason[:400]


def _device_id(npu_id: int, chip_id: int) -> str:
    return f"npu{npu_id}-chip{chip_id}"


def _first_message(lines: tuple[str, ...]) -> str | None:
    """The line that says what went wrong: a dcmi `ret is N` line, else the last line."""
    for line in lines:
        if _RET.search(line):
            return line
    return lines[-1] if lines else None


def _failure_message(code: int, out: str, err: str) -> str:
    # npu-smi prints its errors on stdout, after library log lines such as "DrvMngGetConsoleLogLevel failed".
    lines = tuple(line.strip() for line in (out + "\n" + err).splitlines() if line.strip())
    detail = _first_message(lines) or "no output"
    return _with_hint(f"npu-smi info exited with {code}: {detail[:300]}", detail)


def _with_hint(message: str, detail: str) -> str:
    match = _RET.search(detail)
    if match and match.group(1) in _HINTS:
        return f"{message} ({_HINTS[match.group(1)]})"
    return message
