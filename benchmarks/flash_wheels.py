"""FlashAttention 4 (``attn_kernel="flash"``) for a GPU machine without network: the wheels of
``flash-attn-4`` and what it needs, for that machine's CPython 3.12 on x86-64 Linux, as one tar
cut into parts a device call can carry (64 MiB with the work tree), and the commands that
install them there::

    python -m benchmarks.flash_wheels .cache/fa4

The first call copies ``part_00`` to ``/tmp/fa4`` while the machine stays warm; the next joins the
parts and installs the wheels into a folder on ``PYTHONPATH``. That folder's
``nvidia_cutlass_dsl/dsl_packages`` goes on ``PYTHONPATH`` too: nvidia-cutlass-dsl puts its
``cutlass`` module there with a ``.pth`` file, which ``pip install --target`` leaves unread.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import List, Sequence

#: The versions tested with lecompile (H100 and H200, torch 2.11): FlashAttention 4 and the
#: CUTLASS DSL with its CUDA 12 libraries, as ``pip install flash-attn-4`` takes them.
PACKAGES = ("flash-attn-4==4.0.0b40", "nvidia-cutlass-dsl==4.8.1", "nvidia-cutlass-dsl-libs-base==4.8.1",
            "nvidia-cutlass-dsl-libs-core==4.8.1", "nvidia-cutlass-dsl-libs-cu12==4.8.1",
            "apache-tvm-ffi>=0.1.11,<0.2", "torch-c-dlpack-ext", "quack-kernels>=0.5.3")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64")


def download(folder: Path, packages: Sequence[str] = PACKAGES) -> List[Path]:
    """``packages``' wheels for CPython 3.12 on x86-64 Linux (their own needs are named, not resolved)."""
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
           "3.12", "--implementation", "cp", *(f"--platform={p}" for p in PLATFORMS), "-d", str(folder), *packages]
    subprocess.run(cmd, check=True)
    return sorted(folder.glob("*.whl"))


def cut(wheels: Sequence[Path], folder: Path, part_mib: int = 52) -> List[Path]:
    """``wheels`` as one tar cut into ``folder/part_NN`` of at most ``part_mib`` MiB each."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("part_*"):
        old.unlink()
    with tempfile.TemporaryFile() as tar_file:
        with tarfile.open(fileobj=tar_file, mode="w") as tar:
            for wheel in wheels:
                tar.add(wheel, arcname=wheel.name)
        tar_file.seek(0)
        parts = []
        while chunk := tar_file.read(part_mib << 20):
            parts.append(folder / f"part_{len(parts):02d}")
            parts[-1].write_bytes(chunk)
    return parts


def install_commands(parts: Sequence[Path], target: str = "/tmp/site") -> List[str]:
    """One command per device call, each carrying the part it names (``carry``): the first ones
    copy their part under ``/tmp/fa4``, the last joins them and installs the wheels into ``target``."""
    staged = [f"/tmp/fa4/{p.name}" for p in parts[:-1]]
    copies = [f"mkdir -p /tmp/fa4 && cp {p} /tmp/fa4/" for p in parts[:-1]]
    install = (f"mkdir -p /tmp/fa4w && cat {' '.join([*staged, str(parts[-1])])} | tar x -C /tmp/fa4w && "
               f"python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target {target} "
               f"/tmp/fa4w/*.whl && export PYTHONPATH=.:{target}:{target}/nvidia_cutlass_dsl/dsl_packages")
    return [*copies, install]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.flash_wheels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="where the parts go (a folder git ignores, e.g. .cache/fa4)")
    parser.add_argument("--part-mib", type=int, default=52)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as wheels:
        parts = cut(download(Path(wheels)), args.folder, args.part_mib)
    for i, command in enumerate(install_commands(parts)):
        print(f"call {i + 1} (carry {parts[i]}): {command}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
