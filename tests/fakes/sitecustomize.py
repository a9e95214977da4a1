"""Test double of CUDA's connection to an MPS daemon, for hosts without a GPU.

A Python process started with this folder on PYTHONPATH and ``FAKE_CUDA_MPS=1`` joins the fake
daemon (``nvidia-cuda-mps-control`` here) as soon as ``CUDA_MPS_PIPE_DIRECTORY`` appears in its
environment, and stays a client until it exits: a process of a benchmark run that has the
variable set uses CUDA right away on a GPU, which connects it. ``FAKE_CUDA_LOG`` names a file
that gets one line per process that joined.
"""

from __future__ import annotations

import os
import threading


def watch(interval_s: float = 0.02) -> threading.Event:
    """Join the fake daemon once the variable is set; set the returned event to stop watching."""
    stop = threading.Event()

    def run() -> None:
        while not stop.wait(interval_s):
            pipe = os.environ.get("CUDA_MPS_PIPE_DIRECTORY")
            if pipe and os.path.exists(os.path.join(pipe, "control")):
                os.makedirs(os.path.join(pipe, "clients"), exist_ok=True)
                open(os.path.join(pipe, "clients", str(os.getpid())), "w").close()
                log = os.environ.get("FAKE_CUDA_LOG")
                if log:
                    with open(log, "a") as f:
                        f.write(f"{os.getpid()}\n")
                return

    threading.Thread(target=run, name="fake-cuda-mps", daemon=True).start()
    return stop


if os.environ.get("FAKE_CUDA_MPS") == "1":
    watch()
