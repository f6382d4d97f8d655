"""docs/results.md and the README's results table are generated from benchmarks/results/*.json."""

from benchmarks import results_page


def test_generated_pages_are_up_to_date():
    assert results_page.main(["--check"]) == 0, "run: python -m benchmarks.results_page"


def test_readme_table_holds_only_rows_whose_baseline_ran_in_the_same_run():
    table = results_page.readme_table().splitlines()[2:]
    assert table, "no H200 rows"
    cases = results_page.e2e_latest(results_page.load("e2e"))["NVIDIA H200"]
    for line in table:
        case = line.split(" | ")[0].lstrip("| ")
        by = {r["variant"]: r for r in cases[case]}
        assert by["lecompile-d1-cg"]["run"] == by["inductor-bf16-adapters-cg"]["run"]
        assert f"{by['lecompile-d1-cg']['speedup_vs_strongest']:.2f}x" in line


def test_breakdown_section_shows_each_part_with_its_limit():
    from benchmarks.step_breakdown import PARTS
    parts = dict.fromkeys(PARTS, 1.0) | {"base_gemm": 30.0}
    limits = {"base_gemm": 21.5, "adapter_gemm": 0.4, "attention": None}
    data = {"meta": {"device": "NVIDIA H200"},
            "rows": [{"case": "opt-1.3b lora 8x512", "variant": "lecompile-d1", "kernels_ms": 36.0,
                      "parts": parts, "limits": limits}]}
    row = results_page.breakdown_section(data).splitlines()[-1]
    assert row.startswith("| opt-1.3b lora 8x512 | lecompile-d1 | 36.0 | 30.00 (21.50) | 1.00 (0.40) | 1.00 | ")
