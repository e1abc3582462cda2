"""Timing, peak memory and the description of the machine a benchmark ran on."""

from __future__ import annotations

import datetime
import platform
import resource
import statistics
import time
from typing import Callable

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_iterations(fn: Callable[[], object], *, warmup: int, steps: int, device: torch.device,
                    after_warmup: Callable[[], None] | None = None) -> list[float]:
    """Seconds per call of `fn`, each timed between device synchronisations.

    Warm-up calls run first (allocator, cuDNN/compile autotuning, lazy optimizer state), then
    `after_warmup` (e.g. resetting the peak-memory counter), then the timed calls.
    """
    for _ in range(warmup):
        fn()
    _sync(device)
    if after_warmup is not None:
        after_warmup()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def profile_iterations(fn: Callable[[], object], *, steps: int, device: torch.device, top: int = 20) -> dict:
    """Where the time of `steps` more calls of `fn` goes, per call of `fn`:
    `wall_ms`; `busy_ms`, the summed self time of all operators on the GPU (on the CPU
    where there is no GPU), so `wall_ms - busy_ms` is time the GPU waited on Python,
    launches or data; and `operators`, torch.profiler's per-operator totals, most
    expensive first.

    Run after the timed calls, so the profiler's own overhead never enters the timings
    (it does inflate `wall_ms` a little).
    """
    from torch.profiler import ProfilerActivity, profile

    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        _sync(device)
        wall = time.perf_counter() - start
    rows = []
    for event in prof.key_averages():
        # self_device_time_total / self_cpu_time_total are in microseconds
        # (called self_cuda_time_total before torch 2.4)
        device_us = getattr(event, "self_device_time_total", getattr(event, "self_cuda_time_total", 0.0)) if on_gpu else 0.0
        rows.append({"name": event.key, "calls_per_iteration": event.count / steps,
                     "self_device_ms": device_us / 1e3 / steps,
                     "self_cpu_ms": event.self_cpu_time_total / 1e3 / steps})
    key = "self_device_ms" if on_gpu else "self_cpu_ms"
    rows.sort(key=lambda r: r[key], reverse=True)
    return {"wall_ms": wall * 1e3 / steps, "busy_ms": sum(r[key] for r in rows), "operators": rows[:top]}


def median(times: list[float]) -> float:
    return statistics.median(times)


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return None


class PeakMemory:
    """Peak memory of what runs after `reset()`.

    On a GPU: `torch.cuda.max_memory_allocated` (weights, optimizer state, activations;
    the CUDA context and allocator cache are not in it). On a CPU: how far the process's
    peak resident set grew above its size when `start()` was called — None when it did not
    grow (an earlier peak in the same process hides it).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.rss_start: int | None = None

    def start(self) -> None:
        if self.device.type == "cpu":
            self.rss_start = _rss_bytes()

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_bytes(self) -> int | None:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.rss_start is None:
            return None
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.rss_start  # ru_maxrss: KiB
        return grown if grown > 0 else None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def environment(device: torch.device) -> dict:
    """Versions and hardware, so a number can be traced to what produced it."""
    import open_clip
    import transformers

    import gitcli

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gitcap": gitcli.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "open_clip": open_clip.__version__,
        "device": device_name(device),
        "device_type": device.type,
        "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                   gpu_memory_gib=round(props.total_memory / 1024**3, 1),
                   capability=f"{props.major}.{props.minor}")
    return env
