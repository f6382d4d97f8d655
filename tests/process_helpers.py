"""Functions that tests run in spawned processes, and the one that runs a script as Triton compiles
for real: a module that imports nothing heavy, so the process starts in about a second."""

import json
import os
import signal
import subprocess
import sys
import time


def start_a_child_then_hang(pid_file: str) -> None:
    """Starts a child process, writes its pid, then waits where no signal reaches it (as a native
    kernel compile does)."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    with open(pid_file, "w") as f:
        f.write(str(child.pid))
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM, signal.SIGINT, signal.SIGTERM})
    time.sleep(120)


def run_out_of_memory() -> None:
    import torch
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 15.66 GiB")


def json_from_compiling_script(script: str, timeout: float):
    """Runs ``script`` in a fresh Python where Triton compiles instead of interpreting (the tests'
    ``TRITON_INTERPRET=1`` holds in this process from import on); returns the JSON its last line
    prints."""
    done = subprocess.run([sys.executable, "-c", script], env=dict(os.environ, TRITON_INTERPRET="0"),
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
