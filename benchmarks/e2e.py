"""End-to-end fine-tuning benchmark; the same as ``lecompile bench``. Writes to benchmarks/results.

    python benchmarks/e2e.py --models opt-1.3b llama-3.2-1b --breakdown
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lecompile.e2e import main  # noqa: E402

if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--out" not in argv:
        argv += ["--out", str(Path(__file__).parent / "results")]
    sys.exit(main(argv))
