"""Timing and memory helpers shared by the benchmarks (not part of the library).

`compare` runs several callables side by side in one process: warm-up calls first, then rounds in which
every callable runs once, in an order that rotates from round to round, so that load from other processes
on a shared machine hits every variant alike. Medians are reported; `ratio` divides two medians.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch


def compare(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, dict]:
    """Time every callable `repeats` times, interleaved, after `warmup` untimed calls each.

    Args:
        fns (`dict[str, Callable]`): name -> zero-argument callable.
        repeats (`int`): timed calls per callable.
        warmup (`int`, *optional*, defaults to 1): untimed calls per callable before timing.

    Returns:
        `dict[str, dict]`: name -> `{"median_s", "min_s", "max_s", "samples_s"}`.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for i in range(repeats):
        for name in names[i % len(names):] + names[: i % len(names)]:
            start = time.perf_counter()
            fns[name]()
            samples[name].append(time.perf_counter() - start)
    return {name: summarize(values) for name, values in samples.items()}


def summarize(values: list[float]) -> dict:
    """Median, min, max and the raw samples (seconds)."""
    return {"median_s": statistics.median(values), "min_s": min(values), "max_s": max(values),
            "samples_s": [round(v, 6) for v in values]}


def ratio(a: dict, b: dict) -> float:
    """median(a) / median(b)."""
    return a["median_s"] / b["median_s"]


def maxrss_mib() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_python(code: str, timeout: float = 1800, env: dict | None = None) -> dict:
    """Run `code` in a fresh interpreter; it must print one JSON object as its last stdout line.

    Used for memory measurements: `ru_maxrss` is a per-process high-water mark, so each measurement gets
    its own process.
    """
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "TRANSFORMERS_VERBOSITY": "error", **(env or {})}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          env=full_env, cwd=repo_root())
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark subprocess failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def machine() -> dict:
    """What the numbers were measured on."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    memory_gib = None
    try:
        with open("/proc/meminfo") as f:
            memory_gib = round(int(f.readline().split()[1]) / 2**20, 1)  # MemTotal, KiB
    except (OSError, ValueError, IndexError):
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "cpu": cpu,
        "nproc": os.cpu_count(),
        "memory_gib": memory_gib,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "cuda": torch.cuda.is_available(),
        "loadavg_1_5_15": load,
    }
