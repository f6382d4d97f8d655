"""The zoo table of docs/supported.md is what benchmarks/zoo.py measures today: every
architecture's matches, exactness at density 1.0 and graph count (tiny models on the CPU)."""

import peft
import pytest
import transformers
from packaging.version import Version

from benchmarks import zoo


@pytest.mark.slow
def test_zoo_table_is_up_to_date():
    """On the transformers and PEFT the table was measured with, or newer ones (which must not change
    it unnoticed); older releases differ where their models do (OPT's graph breaks on transformers
    5.17) or where they adapt other layers (PEFT 0.21 leaves Qwen2-MoE's experts alone)."""
    documented = zoo.documented_versions()
    for package, version in zip((transformers, peft), documented):
        if Version(package.__version__) < Version(version):
            pytest.skip(f"the table was measured with {package.__name__} {version}; this is {package.__version__}")
    rows = zoo.run_all(progress=False)
    assert len({r["architecture"] for r in rows}) >= 16
    assert zoo.DOC.read_text() == zoo.document(rows), "run python -m benchmarks.zoo"
