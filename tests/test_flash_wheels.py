"""``benchmarks.flash_wheels``: FlashAttention 4's wheels in parts a device call carries, and the
commands that put them back together and make ``cutlass`` importable."""

import subprocess
import tarfile

from benchmarks import flash_wheels


def test_the_wheels_come_back_whole_and_the_install_puts_cutlass_on_the_path(tmp_path, monkeypatch):
    asked = []

    def pip_download(cmd, check):
        asked.append(cmd)
        folder = tmp_path / "wheels"
        folder.mkdir()
        for i, size in enumerate((3 << 20, 1 << 20, 5)):
            (folder / f"w{i}-1.0-py3-none-any.whl").write_bytes(bytes([i]) * size)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(subprocess, "run", pip_download)
    wheels = flash_wheels.download(tmp_path / "wheels")
    assert [w.name for w in wheels] == ["w0-1.0-py3-none-any.whl", "w1-1.0-py3-none-any.whl", "w2-1.0-py3-none-any.whl"]
    assert "--python-version" in asked[0] and "flash-attn-4==4.0.0b40" in asked[0] and "--no-deps" in asked[0]
    parts = flash_wheels.cut(wheels, tmp_path / "fa4", part_mib=3)
    assert [p.name for p in parts] == ["part_00", "part_01"] and all(p.stat().st_size <= 3 << 20 for p in parts)
    joined = tmp_path / "joined.tar"
    joined.write_bytes(b"".join(p.read_bytes() for p in parts))
    with tarfile.open(joined) as tar:
        assert {m.name: m.size for m in tar.getmembers()} == {w.name: w.stat().st_size for w in wheels}
    first, last = flash_wheels.install_commands(parts, target="/tmp/site")
    assert first == f"mkdir -p /tmp/fa4 && cp {parts[0]} /tmp/fa4/"
    assert f"cat /tmp/fa4/part_00 {parts[1]} | tar x -C /tmp/fa4w" in last
    assert last.endswith("export PYTHONPATH=.:/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages")
