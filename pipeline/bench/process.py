"""What measurements share: fresh processes, peak memory (one process or a whole tree), CPU
names and times, and device synchronisation."""

from __future__ import annotations

import multiprocessing
import os
import platform
import resource
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.periodic import Periodic

_KIB = 1024 / 2**20  # kB in MiB


@dataclass
class MemoryPeaks:
    """The peaks a :class:`ProcessTreeMemory` saw."""

    largest_process_mb: float = 0.0
    whole_run_mb: float = 0.0
    processes: int = 0
    by_process: dict[int, tuple[str, float]] = field(default_factory=dict)  # pid -> name, peak

    def as_dict(self) -> dict[str, float]:
        return {
            "largest_process_mb": round(self.largest_process_mb, 1),
            "whole_run_mb": round(self.whole_run_mb, 1),
            "processes": self.processes,
        }


class ProcessTreeMemory(Periodic):
    """Samples this process and all its descendants in a background thread (a context
    manager); ``peaks`` holds what it saw."""

    def __init__(self, interval: float = 0.2, root: int | None = None) -> None:
        super().__init__(interval, self.sample, "memory")
        self.root = root or os.getpid()
        self.peaks = MemoryPeaks()

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        self.sample()

    def sample(self) -> None:
        """Read every process of the tree once."""
        total = 0.0
        for pid in _descendants(self.root):
            status = _read_fields(f"/proc/{pid}/status", ("Name", "VmHWM"))
            pss = _read_fields(f"/proc/{pid}/smaps_rollup", ("Pss",)).get("Pss")
            if "VmHWM" not in status or pss is None:
                continue  # gone, or a kernel thread
            peak = _kb(status["VmHWM"]) * _KIB
            name, seen = self.peaks.by_process.get(pid, (status.get("Name", "?"), 0.0))
            self.peaks.by_process[pid] = (name, max(seen, peak))
            self.peaks.largest_process_mb = max(self.peaks.largest_process_mb, peak)
            total += _kb(pss) * _KIB
        self.peaks.whole_run_mb = max(self.peaks.whole_run_mb, total)
        self.peaks.processes = len(self.peaks.by_process)


def _descendants(root: int) -> list[int]:
    """``root`` and every process below it (from each process's parent in ``/proc``)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def _read_fields(path: str, names: tuple[str, ...]) -> dict[str, str]:
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return {}
    fields = {}
    for line in lines:
        key, _, value = line.partition(":")
        if key in names:
            fields[key] = value.strip()
    return fields


def _kb(value: str) -> float:
    return float(value.split()[0])


def in_fresh_process(function: Any, *args: Any) -> dict[str, Any]:
    """``function(*args)`` in a new interpreter (spawn: nothing inherited but the arguments)."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(function, *args).result()


def host_cpu_seconds() -> float:
    """User and system CPU time of this process so far, all its threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB.

    On Linux, ``VmHWM`` of ``/proc/self/status``: the high-water mark of this process's own
    memory. ``ru_maxrss`` is not used there because it survives ``fork`` + ``exec``, so a
    spawned child would report the parent's peak (the bench's parent holds the test audio).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**10  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if platform.system() == "Darwin" else 2**10)


def reset_device_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_peak(device: torch.device, prefix: str) -> dict[str, float]:
    if device.type != "cuda":
        return {}
    return {f"{prefix}_cuda_peak_mb": torch.cuda.max_memory_allocated(device) / 2**20}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or f"{os.cpu_count()} CPUs"


def timed(device: torch.device, work: Any) -> float:
    synchronize(device)
    started = time.perf_counter()
    work()
    synchronize(device)
    return time.perf_counter() - started
