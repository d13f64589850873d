"""NVDEC and SM utilisation and GPU memory, sampled by `nvidia-smi -lms` in the background during a measurement.

nvidia-smi sees the whole device, DALI's and PyTorch's memory alike, which `torch.cuda` statistics do not.
On a machine without nvidia-smi every figure is None, so the CPU runs of the benchmark take the same path.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from typing import Dict, List, Optional, Tuple

FIELDS = ("utilization.decoder", "utilization.gpu", "memory.used")


def available() -> bool:
    return shutil.which("nvidia-smi") is not None


def _query(fields: Tuple[str, ...]) -> List[str]:
    return ["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits", "-i", "0"]


def _parse(line: str) -> Optional[List[Optional[float]]]:
    values = []
    for cell in line.split(","):
        cell = cell.strip()
        try:
            values.append(float(cell))
        except ValueError:  # "[N/A]" where a driver does not report a field
            values.append(None)
    return values if values else None


def memory_used_mib() -> Optional[float]:
    """Device memory in use now (MiB), or None without nvidia-smi."""
    if not available():
        return None
    done = subprocess.run(_query(("memory.used",)), capture_output=True, text=True, timeout=20)
    parsed = _parse(done.stdout.strip().splitlines()[0]) if done.returncode == 0 and done.stdout.strip() else None
    return parsed[0] if parsed else None


class GpuMonitor:
    """Context manager: samples every `interval_ms`; `window()` summarises the samples between two marks."""

    def __init__(self, interval_ms: int = 200):
        self.interval_ms = interval_ms
        self.samples: List[Tuple[float, Dict[str, Optional[float]]]] = []
        self.fields = FIELDS
        self._proc: Optional[subprocess.Popen] = None
        self._reader: Optional[threading.Thread] = None

    def __enter__(self) -> "GpuMonitor":
        if available():
            self.fields = self._supported_fields()
            self._proc = subprocess.Popen(_query(self.fields) + ["-lms", str(self.interval_ms)],
                                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self._reader = threading.Thread(target=self._read, daemon=True)
            self._reader.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        if self._reader is not None:
            self._reader.join(timeout=5)

    def _supported_fields(self) -> Tuple[str, ...]:
        """All of FIELDS if this driver answers them, else without the decoder field (older drivers)."""
        if subprocess.run(_query(FIELDS), capture_output=True, timeout=20).returncode == 0:
            return FIELDS
        return tuple(f for f in FIELDS if f != "utilization.decoder")

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            values = _parse(line)
            if values and len(values) == len(self.fields):
                self.samples.append((time.time(), dict(zip(self.fields, values))))

    def window(self, start: float, end: float, baseline_mib: Optional[float]) -> Dict[str, Optional[float]]:
        """Mean NVDEC and SM utilisation (%) over [start, end] and peak memory over the whole run minus the
        baseline (MiB): the pipeline's buffers exist from its build on, before the timed window starts."""
        inside = [s for t, s in self.samples if start <= t <= end]
        peak = max((s["memory.used"] for _, s in self.samples if s.get("memory.used") is not None), default=None)
        return {
            "nvdec %": _mean(s.get("utilization.decoder") for s in inside),
            "sm %": _mean(s.get("utilization.gpu") for s in inside),
            "mem MiB": peak - baseline_mib if peak is not None and baseline_mib is not None else None,
        }


def _mean(values) -> Optional[float]:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None
