"""choose_layouts three ways: as it was first (fp32 matmuls against float layouts), as it was next
(broadcast reductions over every layout's mask, which Inductor fuses; now ``choose_layouts_ref``)
and as it is (column and skewed-diagonal sums, ``O(n m)`` per head): same output on random inputs,
and on the GPU the time of each, compiled and replayed as a CUDA graph.
``python -m benchmarks.profiles.choose_layouts``; the H100 numbers of the first two are in
results/profiles/choose_layouts.txt."""
import torch

from lecompile.predictors.attention import SELECTION_ROUNDS, atomic_layouts, choose_layouts, choose_layouts_ref


def choose_layouts_matmul(mass, allowed, density):
    """The function before commit feabfde."""
    B, H, n, m = mass.shape
    layouts = atomic_layouts(n, m, mass.device)[0]
    allowed = allowed.expand(B, H, n, m)
    flat = layouts.flatten(1).float()
    budget = density * allowed.flatten(2).sum(-1, keepdim=True)
    must = torch.zeros(flat.shape[0], dtype=torch.bool, device=mass.device)
    must[0] = must[m] = True
    keep = allowed & (must.float() @ flat).reshape(n, m).bool()
    for _ in range(SELECTION_ROUNDS):
        new = (allowed & ~keep).flatten(2).float()
        cost = new @ flat.T
        gain = (mass.flatten(2) * new) @ flat.T
        ratio = torch.where(cost > 0, gain / cost.clamp(min=1), -1.0)
        order = ratio.argsort(dim=-1, descending=True)
        spent = cost.gather(-1, order).cumsum(-1) + keep.flatten(2).sum(-1, keepdim=True)
        chosen = (spent <= budget) & (ratio.gather(-1, order) >= 0)
        picked = torch.zeros_like(chosen).scatter(-1, order, chosen)
        keep = keep | ((picked.float() @ flat).reshape(B, H, n, m) > 0) & allowed
    return keep


def case(B, H, n, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    mass = torch.rand(B, H, n, n, generator=g).to(device)
    allowed = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    mass = (mass * allowed).softmax(-1) * allowed
    return mass, allowed


VERSIONS = {"matmul": choose_layouts_matmul, "fused": choose_layouts_ref, "diagonal sums": choose_layouts}


def main():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # 8x512, 2x2048, 4x1024, then 1x8192 to 1x32768, in 128-token blocks
    for B, H, n in [(8, 32, 4), (2, 32, 16), (4, 32, 8), (1, 32, 64), (1, 32, 128), (1, 32, 256)]:
        mass, allowed = case(B, H, n, device)
        for density in (0.5, 0.3):
            a, *others = (fn(mass, allowed, density) for fn in VERSIONS.values())
            print("equal", (B, H, n, density), all(torch.equal(a, b) for b in others))
        if device == "cuda":
            from triton.testing import do_bench_cudagraph
            for name, fn in VERSIONS.items():
                f = torch.compile(fn)
                f(mass, allowed, 0.5)
                ms = do_bench_cudagraph(lambda: f(mass, allowed, 0.5), rep=50)
                print(name, (B, H, n), f"{ms * 1000:.1f} us")


if __name__ == "__main__":
    main()
