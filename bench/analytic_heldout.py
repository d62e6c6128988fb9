"""The analytic bench on held-out problems (bench/heldout_problems.py): peers and torchdiffusion in one run,
with the referee's own harness, metrics and seeds; only the problem table is extended.

    python bench/analytic_heldout.py --bench-dir ../shared/bench [analytic_bench.py options]
Default: problems fashion64,ring16, NFE 5,10,20, n = 1000 samples, every peer row (k-diffusion, diffusers)
beside our rows of the same algorithms and our optimised-grid rows,
results in bench/results/analytic_torchdiffusion_heldout.{csv,md}. The optimised grids come from
bench/analytic_grids.py --problems fashion64,ring16 (the same rule as for the bench's problems).
"""
from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    bench_dir = os.path.join(HERE, "..", "..", "shared", "bench")
    if "--bench-dir" in argv:
        k = argv.index("--bench-dir")
        bench_dir = argv[k + 1]
        del argv[k:k + 2]
    bench_dir = os.path.abspath(bench_dir)
    os.chdir(bench_dir)  # the bench resolves its default peer adapters relative to its folder
    sys.path.insert(0, bench_dir)
    sys.path.insert(0, HERE)
    import analytic_bench  # noqa: E402
    import analytic_problems  # noqa: E402
    import heldout_problems  # noqa: E402

    names = heldout_problems.register(analytic_problems)
    # every peer row; ours: the Karras-grid rows of the same algorithms and the optimised-grid rows
    rows = "k-diffusion/,diffusers/,torchdiffusion/unipc,torchdiffusion/dpmpp_2m,torchdiffusion/euler," \
           "torchdiffusion/ipndm,torchdiffusion/deis,torchdiffusion/lms,torchdiffusion/heun,torchdiffusion/ddim"
    defaults = ["--problems", ",".join(names), "--nfe", "5,10,20", "--no-extra", "--n", "1000", "--samplers", rows,
                "--adapter", os.path.join(HERE, "adapters", "torchdiffusion_analytic.py"),
                "--out-dir", os.path.join(HERE, "results"), "--tag", "torchdiffusion_heldout"]
    analytic_bench.main(defaults + argv)


if __name__ == "__main__":
    main()
