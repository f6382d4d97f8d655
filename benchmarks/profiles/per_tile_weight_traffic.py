"""Why per-tile indices fall behind shared ones at low density: the weight bytes they must read.

With per-tile indices each 128-token tile keeps its own ``k`` neurons, so the forward and backward
read ``k x d`` weight rows per tile from each MLP matrix (fc1 and fc2; gate, up and down for
LLaMA) twice (forward, and the backward's N- and K-gathers); independent random index sets, as in
``bench_sparse_mlp.py``, overlap between tiles only as much as the density, so L2 rarely serves
them. A tile of 128 tokens does 256 flops per 2-byte weight element, 128 per byte, below the H100's
ridge (989 TFLOP/s bf16 / 3.35 TB/s HBM3 = 295 flop/byte): without L2 hits those GEMMs are bound by
memory whatever the kernel, while shared indices reuse one set of rows across all tiles and stay
compute-bound. (Activations add to the bytes; this counts weights only, a lower bound.)

This prints, for the measured density <= 0.11 rows of ``benchmarks/results/sparse_mlp.json``, the
per-tile over shared GPU-time ratio and the time the per-tile weight reads alone take at the HBM's
peak bandwidth, as a share of the shared-index time. ``python -m
benchmarks.profiles.per_tile_weight_traffic``; output in results/profiles/per_tile_weight_traffic.txt.
"""
import json
from pathlib import Path

HBM_BYTES_PER_S = 3.35e12  # H100 SXM, HBM3
TILE = 128


def main():
    rows = json.loads((Path(__file__).parents[1] / "results" / "sparse_mlp.json").read_text())["rows"]
    timed = {(r["case"], r["batch"], r["density"], r["variant"]): r for r in rows
             if r.get("pass") == "fwd+bwd" and r["density"] <= 0.11 and "graph_ms" in r}
    print(f"{'MLP':15s} {'tokens':7s} {'density':>7s} {'k':>5s} {'tile ms':>8s} {'shared ms':>9s} "
          f"{'tile/shared':>11s} {'weight reads at peak HBM / shared':>34s}")
    for (case, batch, density, variant), r in sorted(timed.items()):
        if variant != "lecompile-tile":
            continue
        shared = timed[(case, batch, density, "lecompile-shared")]["graph_ms"]
        matrices = 3 if "llama" in case else 2
        weight_bytes = 2 * matrices * (r["tokens"] // TILE) * r["k"] * r["d"] * 2
        bound_ms = weight_bytes / HBM_BYTES_PER_S * 1e3
        print(f"{case:15s} {batch}x{r['seq']:<5d} {density:7.3f} {r['k']:5d} {r['graph_ms']:8.3f} {shared:9.3f} "
              f"{r['graph_ms'] / shared:11.2f} {bound_ms / shared:34.2f}")


if __name__ == "__main__":
    main()
