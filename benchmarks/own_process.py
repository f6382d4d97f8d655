"""Run a function in a spawned process of its own, under a time limit that holds where no signal
reaches (a kernel compiler's native code, a wait on the GPU): past the limit the process's whole
group is killed, Inductor's compile workers with it. Standard library only, so that a process
running a light function starts in about a second."""

from __future__ import annotations

import multiprocessing
import os
import signal
from typing import Callable


class ProcessTimeout(TimeoutError):
    """The function was still running at the time limit; its process group was killed."""


class ProcessFailed(RuntimeError):
    """The function raised ``error`` (its repr) or its process died; ``out_of_memory`` where it was
    PyTorch's ``OutOfMemoryError``."""

    def __init__(self, error: str, out_of_memory: bool = False):
        super().__init__(error)
        self.error, self.out_of_memory = error, out_of_memory

    def __repr__(self) -> str:
        return self.error


def in_own_process(fn: Callable, args: tuple, timeout: float, what: str = "it"):
    """``fn(*args)`` in a spawned process that leads a process group of its own: its result, or
    :class:`ProcessFailed` with its error; past ``timeout`` seconds the group is killed and
    :class:`ProcessTimeout` raised (its message names the limit as ``what``). ``fn``, ``args`` and
    the result must pickle, by names the parent imports too."""
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_in_own_group, args=(fn, args, send))
    process.start()
    send.close()
    try:
        if not receive.poll(timeout):
            raise ProcessTimeout(f"still running after {what} {timeout:g} s")
        try:
            status, value, out_of_memory = receive.recv()
        except EOFError:  # it died without a word (a crash, the OOM killer)
            process.join()
            raise ProcessFailed(f"its process ended with exit code {process.exitcode}") from None
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:  # it ended, or had not yet made its group
            pass
        process.kill()
        process.join()
    if status == "error":
        raise ProcessFailed(value, out_of_memory)
    return value


def _in_own_group(fn: Callable, args: tuple, send) -> None:
    os.setsid()
    try:
        send.send(("ok", fn(*args), False))
    except BaseException as err:  # noqa: BLE001 (the parent records it)
        send.send(("error", repr(err)[:400], type(err).__name__ == "OutOfMemoryError"))
