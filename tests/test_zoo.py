"""The zoo table of docs/supported.md is what benchmarks/zoo.py measures today: every
architecture's matches, exactness at density 1.0 and graph count (tiny models on the CPU)."""

import pytest
import transformers
from packaging.version import Version

from benchmarks import zoo


@pytest.mark.slow
def test_zoo_table_is_up_to_date():
    """On the transformers the table was measured with, or a newer one (which must not change it
    unnoticed); an older release differs where its models do (OPT's graph breaks on 5.17)."""
    documented = zoo.documented_transformers()
    if Version(transformers.__version__) < Version(documented):
        pytest.skip(f"the table was measured with transformers {documented}; this is {transformers.__version__}")
    rows = zoo.run_all(progress=False)
    assert len({r["architecture"] for r in rows}) >= 16
    assert zoo.DOC.read_text() == zoo.document(rows), "run python -m benchmarks.zoo"
