"""The zoo table of docs/supported.md is what benchmarks/zoo.py measures today: every
architecture's matches, exactness at density 1.0 and graph count (tiny models on the CPU)."""

import pytest

from benchmarks import zoo


@pytest.mark.slow
def test_zoo_table_is_up_to_date():
    rows = zoo.run_all(progress=False)
    assert len({r["architecture"] for r in rows}) >= 16
    assert zoo.DOC.read_text() == zoo.document(rows), "run python -m benchmarks.zoo"
