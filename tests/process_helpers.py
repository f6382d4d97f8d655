"""Functions that tests run in spawned processes: a module that imports nothing heavy, so the
process starts in about a second."""

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
