"""The timer choice shared by the training benchmarks: wall clock, or one thread's CPU time."""
from __future__ import annotations

import time
from typing import Callable

import torch


def configure_clock(clock: str, threads: int | None) -> Callable[[], float]:
    """Set torch's intra-op threads and return the timer; ``cpu`` needs exactly one thread to mean anything."""
    if clock == "cpu" and threads != 1:
        raise SystemExit("--clock cpu measures one thread's CPU time: add --threads 1")
    if threads:
        torch.set_num_threads(threads)
    return time.thread_time if clock == "cpu" else time.perf_counter
