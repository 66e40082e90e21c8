"""Per-iteration training time and step peak memory of nnU-Net trainers, measured side by side.

Data loading is excluded: batches are drawn once from a trainer's own data loader and then replayed, and
the trainers' steps are interleaved so that machine noise hits them alike. Report ratios, not seconds.

Peak memory of a step: CUDA ``max_memory_allocated`` on a GPU; on CPU (Linux) the peak resident set size during
the step above the resident size before it. For the CPU figure to follow live memory, measure each trainer in a
fresh process whose allocator returns large blocks to the system at once (``CPU_MEMORY_ENV``).
"""

import json
import os
import statistics
import subprocess
import sys
import time

import torch


def median_step_seconds(runs: dict[str, tuple], repeats: int = 5, warmup: int = 1) -> dict[str, float]:
    """Median seconds of one ``train_step`` per named (trainer, batches) pair, steps interleaved across pairs."""
    for trainer, batches in runs.values():
        trainer.network.train()
        for batch in batches[:warmup]:
            trainer.train_step(batch)
    times = {name: [] for name in runs}
    for i in range(repeats):
        for name, (trainer, batches) in runs.items():
            batch = batches[i % len(batches)]
            _synchronize(trainer.device)
            start = time.perf_counter()
            trainer.train_step(batch)
            _synchronize(trainer.device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


# glibc malloc: blocks from 64 KiB on are mmap'd and unmapped on free, so RSS tracks what is alive.
CPU_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def step_peak_bytes(trainer, batch: dict) -> int:
    """Peak memory one ``train_step`` adds above what is live before it (see the module docstring)."""
    if trainer.device.type == "cuda":
        torch.cuda.synchronize(trainer.device)
        before = torch.cuda.memory_allocated(trainer.device)
        torch.cuda.reset_peak_memory_stats(trainer.device)
        trainer.train_step(batch)
        torch.cuda.synchronize(trainer.device)
        return torch.cuda.max_memory_allocated(trainer.device) - before
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak resident size (VmHWM) to the current one
    before = _status_bytes("VmRSS")
    trainer.train_step(batch)
    return _status_bytes("VmHWM") - before


def max_step_peak_bytes(trainer, batches: list[dict], steps: int = 4) -> int:
    """Largest :func:`step_peak_bytes` over ``steps`` steps, after one step whose first-time allocations
    (optimizer state) are not the step's working memory."""
    trainer.network.train()
    trainer.train_step(batches[0])
    return max(step_peak_bytes(trainer, batches[i % len(batches)]) for i in range(steps))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_fresh_process(argv: list[str]):
    """Runs ``python *argv`` in a fresh process with ``CPU_MEMORY_ENV`` and returns the JSON value on the last
    line of its standard output (for the step peak memory of one trainer)."""
    out = subprocess.run([sys.executable, *argv], capture_output=True, text=True, check=True,
                         env={**os.environ, **CPU_MEMORY_ENV}).stdout
    return json.loads(out.strip().splitlines()[-1])
