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
