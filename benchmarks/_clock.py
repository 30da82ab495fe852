"""The timer choice shared by the training benchmarks: wall clock, or one thread's CPU time."""
from __future__ import annotations

import argparse
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


def add_clock_args(p: argparse.ArgumentParser) -> None:
    """--threads and --clock, the same in every training benchmark."""
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: time each step by the main thread's CPU time (needs --threads 1); on a shared, busy "
                        "machine it counts the work done rather than the time spent waiting for a core")
