"""GPUs: pinning a process to one, counting them, and reading utilisation and memory from NVML.

NVML numbers devices by their physical index and ignores ``CUDA_VISIBLE_DEVICES``, so the GPU a
process sees as ``cuda:0`` is looked up from that variable's first entry: an integer is an NVML
index, a ``GPU-...`` or ``MIG-...`` entry is a UUID.
"""

from __future__ import annotations

import importlib
import os
import subprocess
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from gpulb.errors import ConfigError
from gpulb.logs import get_logger

log = get_logger("gpulb.worker.gpu")
MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class GpuSample:
    util_percent: float | None
    mem_used_mb: float | None
    mem_total_mb: float | None


def visible_list(env: dict[str, str] | None = None) -> list[str] | None:
    """The entries of CUDA_VISIBLE_DEVICES, or None when it is unset (every GPU visible)."""
    value = (env if env is not None else os.environ).get("CUDA_VISIBLE_DEVICES")
    return None if value is None else [part.strip() for part in value.split(",") if part.strip()]


def pin_to_gpu(gpu: int) -> str:
    """Make only GPU ``gpu`` visible to this process (call before anything imports CUDA); returns its entry.

    ``gpu`` counts in PCI bus order, as NVML and nvidia-smi do (CUDA's own default is fastest first), and
    within what this process may already see: under CUDA_VISIBLE_DEVICES=4,5 (a scheduler's share of the
    host), GPU 1 is physical GPU 5.
    """
    allowed = visible_list()
    if allowed is not None and gpu >= len(allowed):
        raise ConfigError(
            f"--gpu {gpu}: only {len(allowed)} GPU(s) visible here (CUDA_VISIBLE_DEVICES={','.join(allowed)})"
        )
    entry = allowed[gpu] if allowed is not None else str(gpu)
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    os.environ["CUDA_VISIBLE_DEVICES"] = entry
    return entry


def visible_device(env: dict[str, str] | None = None) -> str | None:
    """The first entry of CUDA_VISIBLE_DEVICES ("" or unset: None)."""
    value = (env if env is not None else os.environ).get("CUDA_VISIBLE_DEVICES", "")
    first = value.split(",")[0].strip()
    return first or None


def _load_nvml() -> ModuleType | None:
    try:
        pynvml = importlib.import_module("pynvml")
        pynvml.nvmlInit()
    except Exception as exc:  # not installed, no driver, no GPU: all mean "no NVML figures"
        log.debug("nvml unavailable", error=str(exc))
        return None
    return pynvml


class GpuMonitor:
    """Utilisation and memory of the GPU this process sees first; None fields where NVML cannot tell."""

    def __init__(self, nvml: ModuleType | None = None, device: str | None = None) -> None:
        self._nvml = nvml if nvml is not None else _load_nvml()
        self._handle = self._find_handle(device if device is not None else visible_device() or "0")

    @property
    def available(self) -> bool:
        return self._handle is not None

    def _find_handle(self, device: str) -> Any:
        if self._nvml is None:
            return None
        try:
            if device.startswith(("GPU-", "MIG-")):
                return self._nvml.nvmlDeviceGetHandleByUUID(device)
            return self._nvml.nvmlDeviceGetHandleByIndex(int(device))
        except Exception as exc:
            log.warning("no NVML handle for the visible GPU", device=device, error=str(exc))
            return None

    def sample(self) -> GpuSample:
        if self._handle is None or self._nvml is None:
            return GpuSample(None, None, None)
        util = self._read(lambda: float(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu))
        memory = self._read(lambda: self._nvml.nvmlDeviceGetMemoryInfo(self._handle))
        if memory is None:
            return GpuSample(util, None, None)
        return GpuSample(util, memory.used / MIB, memory.total / MIB)

    @staticmethod
    def _read(call: Any) -> Any:
        try:
            return call()
        except Exception:  # MIG slices, for one, report no utilisation: that figure stays unknown
            return None


def count_gpus(nvml: ModuleType | None = None) -> int:
    """How many GPUs this host has (NVML, else ``nvidia-smi -L``); 0 if neither can tell."""
    nvml = nvml if nvml is not None else _load_nvml()
    if nvml is not None:
        try:
            return int(nvml.nvmlDeviceGetCount())
        except Exception as exc:
            log.warning("nvml could not count GPUs", error=str(exc))
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in listing.stdout.splitlines() if line.startswith("GPU "))


def parse_gpu_list(spec: str, *, count: int | None = None) -> list[int]:
    """``"0,1,3"`` -> [0, 1, 3]; ``"all"`` -> every GPU of this host (``count`` for tests)."""
    if spec.strip().lower() == "all":
        allowed = visible_list()
        found = count if count is not None else len(allowed) if allowed is not None else count_gpus()
        if found == 0:
            raise ConfigError("--gpus all: no GPU found (neither NVML nor nvidia-smi sees one); list them: --gpus 0,1")
        return list(range(found))
    try:
        gpus = [int(part) for part in spec.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--gpus {spec!r}: expected 'all' or comma-separated GPU indices like 0,1,2") from None
    if not gpus or any(g < 0 for g in gpus) or len(set(gpus)) != len(gpus):
        raise ConfigError(f"--gpus {spec!r}: expected distinct, non-negative GPU indices like 0,1,2")
    return gpus
