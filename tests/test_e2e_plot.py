"""The end-to-end benchmark's plot: the newest cases only, so that it stays readable."""

from benchmarks import e2e


def _row(case, variant, run=None, **extra):
    return dict(case=case, variant=variant, ms=10.0, **({"run": run} if run is not None else {}), **extra)


def test_the_plot_keeps_the_newest_cases_in_their_first_order():
    latest = {(r["case"], r["variant"]): r for r in (
        _row("a", "eager", 1), _row("b", "eager", 2), _row("a", "lecompile-d1", 5), _row("c", "eager", 3),
        _row("d", "eager"))}  # a fresh run's row has no run number yet: the newest
    assert e2e.newest_cases(latest, limit=3) == ["a", "c", "d"]
    assert e2e.newest_cases(latest, limit=10) == ["a", "b", "c", "d"]


def test_a_results_file_of_many_cases_plots(tmp_path):
    rows = [_row(f"case {i}", v, i, speedup=1.1, speedup_vs_strongest=1.0, mem_vs_eager=0.9, mlp_density=1.0,
                 attn_density=1.0) for i in range(3 * e2e.PLOTTED_CASES) for v in ("eager", "lecompile-d1-cg")]
    e2e.plot(rows, tmp_path / "e2e.png")
    assert (tmp_path / "e2e.png").stat().st_size > 0


def test_quality_settings_plot_beside_density_one_not_on_the_density_curves():
    latest = {(r["case"], r["variant"]): r for r in (
        _row("a", "lecompile-d1-cg", 1, mlp_density=1.0, attn_density=1.0, speedup_vs_strongest=1.08),
        _row("a", "lecompile-d0.5-cg", 1, mlp_density=0.5, attn_density=1.0, speedup_vs_strongest=1.04),
        _row("a", "lecompile-schedule-learned-0.5-cg", 1, mlp_density=0.5, attn_density=1.0,
             speedup_vs_strongest=0.87, quality_setting="schedule-learned-0.5", heldout_delta=0.0088),
        _row("b", "lecompile-d1-cg", 1, mlp_density=1.0, attn_density=1.0, speedup_vs_strongest=1.1))}
    assert e2e.density_curves(latest, ["a", "b"]) == {"a": [(0.5, 1.04), (1.0, 1.08)]}
    assert e2e.quality_points(latest, ["a", "b"]) == {
        "a": [(0.0, 1.08, "density 1.0"), (0.88, 0.87, "schedule-learned-0.5")]}
