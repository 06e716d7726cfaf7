"""Runs benchmark rows' ops once each (after a warm-up call), for a profiler to watch, e.g.

    ncu --kernel-name regex:conv_gemm --launch-skip 1 --launch-count 1 --set full \\
        python3 -P benchmarks/profile_rows.py conv/L2/fprop/bf16/NHWC

Names are the benchmark's row names (``python -m jax_convnet.benchmark --list``); each may be a
substring, and every row it matches runs. ``--xla`` runs XLA's version of the op instead of ours.
Each op runs twice: the first call compiles and warms up, so profile with a launch skip.
"""
import argparse

import jax

from jax_convnet import benchmark


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("rows", nargs="+")
    p.add_argument("--xla", action="store_true", help="run XLA's op instead of ours")
    args = p.parse_args(argv)
    rows = benchmark.build_rows(jax.devices()[0].platform, filters=args.rows)
    if not rows:
        raise SystemExit(f"no benchmark row matches {args.rows}")
    for row in rows:
        ours, xla, fn_args, _ = benchmark.row_functions(row, benchmark.make_inputs(row))
        fn = jax.jit(xla if args.xla else ours)
        for _ in range(2):
            jax.block_until_ready(fn(*fn_args))
        print(row.name, "ran", flush=True)


if __name__ == "__main__":
    main()
