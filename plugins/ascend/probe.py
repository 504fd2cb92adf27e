"""Huawei Ascend NPUs through one `npu-smi info` per tick (README.md in this folder)."""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import ClassVar

from capmon.agent import CommandRunner, DeviceSample, Probe, ProbeConfig, ProbeUnavailable, run_command
from capmon.plugins.ascend.parser import NpuChip, NpuSmiInfo, parse_npu_smi_info

log = logging.getLogger(__name__)

_MIB = 1024 * 1024
# npu-smi is killed at this share of the probe's timeout, so the probe (not the agent) reports it.
_COMMAND_SHARE_OF_TIMEOUT = 0.8
_RET = re.compile(r"ret is (-?\d+)")
# dcmi return codes people meet most, with what to do about them.
_HINTS = {
    "-8005": "no access to the NPU driver: run the agent as root or as a user in group HwHiAiUser",
    "-8020": "the NPUs are held by another container",
}
PLACEHOLDER_DEVICE_ID = "npu-smi"


@dataclass(frozen=True, slots=True)
class AscendConfig(ProbeConfig):
    """Options of the ascend probe (`[probes.ascend]`)."""

    # The npu-smi binary: a name looked up on PATH, or an absolute path.
    npu_smi: str = "npu-smi"
    # npu-smi Health `Warning` is a minor alarm and the chip still computes, so by default it stays
    # available (the health shows in `info`); set true to report Warning chips unavailable.
    warning_is_unhealthy: bool = False


class AscendProbe(Probe):
    """Every chip of every NPU, from the default `npu-smi info` table (one call per tick)."""

    name: ClassVar[str] = "ascend"
    vendor: ClassVar[str] = "ascend"
    Config: ClassVar[type[ProbeConfig]] = AscendConfig
    default_interval_s: ClassVar[float] = 10.0
    default_timeout_s: ClassVar[float] = 10.0
    config: AscendConfig

    def __init__(self, config: AscendConfig | None = None, run: CommandRunner | None = None) -> None:
        super().__init__(config)
        self._run: CommandRunner = run if run is not None else run_command
        self._check_path = run is None
        self._npu_smi = self.config.npu_smi
        # Chips of the last good parse: reported unavailable when npu-smi fails.
        self._known: list[NpuChip] = []
        self._logged: set[str] = set()
        # The failure logged last; cleared by a good reading, so the next outage is logged again.
        self._failure: str | None = None

    def setup(self) -> None:
        """Find npu-smi; an injected runner stands for the binary, so it is not looked up then."""
        if not self._check_path:
            return
        found = shutil.which(self.config.npu_smi)
        if found is None:
            if self.config.npu_smi == "npu-smi":
                raise ProbeUnavailable("npu-smi not on PATH")
            raise ProbeUnavailable(f"npu-smi not found at {self.config.npu_smi!r}")
        self._npu_smi = found

    def sample(self) -> list[DeviceSample]:
        """Run `npu-smi info` once and turn each chip into a sample; failures become unavailable devices."""
        timeout = self.timeout_s * _COMMAND_SHARE_OF_TIMEOUT
        try:
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
        return [self._device(chip, info) for chip in info.chips]

    def _device(self, chip: NpuChip, info: NpuSmiInfo) -> DeviceSample:
        healthy, error = self._health(chip.health)
        if chip.hbm_total_mb:
            used, total = chip.hbm_used_mb, chip.hbm_total_mb
        elif chip.memory_total_mb:
            used, total = chip.memory_used_mb, chip.memory_total_mb
        else:
            used, total = None, None
        details = {
            "bus_id": chip.bus_id,
            "health": chip.health,
            "npu_smi_version": info.version,
            "logic_id": None if chip.logic_id is None else str(chip.logic_id),
        }
        return DeviceSample(
            device_id=_device_id(chip.npu_id, chip.chip_id),
            vendor=self.vendor,
            model=chip.name,
            index=chip.npu_id,
            util_pct=chip.aicore_pct if chip.aicore_pct is not None else chip.npu_util_pct,
            memory_used_bytes=None if used is None else used * _MIB,
            memory_total_bytes=None if total is None else total * _MIB,
            power_w=chip.power_w,
            temp_c=chip.temp_c,
            processes=info.process_count(chip.npu_id, chip.chip_id),
            healthy=healthy,
            error=error,
            info={k: v for k, v in details.items() if v is not None},
        )

    def _health(self, health: str | None) -> tuple[bool, str | None]:
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
        return [
            DeviceSample(
                device_id=_device_id(chip.npu_id, chip.chip_id),
                vendor=self.vendor,
                model=chip.name,
                index=chip.npu_id,
                healthy=False,
                error=reason,
            )
            for chip in self._known
        ]

    def _log_once(self, message: str) -> None:
        if message not in self._logged:
            self._logged.add(message)
            log.warning("%s", message)


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
