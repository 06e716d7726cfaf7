"""Markdown tables for benchmarks/RESULTS.md from a ``python -m jax_convnet.benchmark`` JSON file.

    python benchmarks/results_table.py OUT/benchmark.json [--copy-tbps TB/s]

Pool rows get the bytes each row must move at least (forward: input read + output written;
backward as jax.grad runs it: input and cotangent read, gradient written) and the time that takes
at the card's copy bandwidth: the one the run measured (``copy_gbps`` in the JSON), or
``--copy-tbps`` for older files (DESIGN.md section 5: 2.88 TB/s on the H100).
"""
import argparse
import json


def conv_table(rows):
    out = ["| row | ours ms | XLA ms | ours TFLOP/s | XLA TFLOP/s | XLA/ours |",
           "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['name']} | error: {r['error'][:60]} | | | | |")
            continue
        out.append(f"| {r['name']} | {r['ms']:.3f} | {r['xla_ms']:.3f} | {r['tflops']:.3g} | "
                   f"{r['xla_tflops']:.3g} | {r['ratio']:.2f} |")
    return out


def pool_table(rows, copy_tbps):
    """copy_tbps <= 0: no floor columns (no measured copy bandwidth for the machine)."""
    floor = copy_tbps > 0
    out = ["| row | ours ms | XLA ms | XLA/ours | bytes moved (MB) | ours TB/s |"
           + (" floor ms | ours % of copy |" if floor else ""),
           "|---|---:|---:|---:|---:|---:|" + ("---:|---:|" if floor else "")]
    for r in rows:
        if "error" in r:
            empty = " | |" if floor else ""
            out.append(f"| {r['name']} | error: {r['error'][:60]} | | | | |{empty}")
            continue
        line = (f"| {r['name']} | {r['ms']:.4f} | {r['xla_ms']:.4f} | {r['ratio']:.2f} | "
                f"{r['bytes'] / 1e6:.1f} | {r['bytes'] / r['ms'] / 1e9:.2f} |")
        if floor:
            floor_ms = r["bytes"] / (copy_tbps * 1e12) * 1e3
            line += f" {floor_ms:.4f} | {100 * floor_ms / r['ms']:.0f}% |"
        out.append(line)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json")
    p.add_argument("--copy-tbps", type=float, default=None,
                   help="copy bandwidth (read + write) of the card, TB/s (default: the one the "
                        "run measured, if any); 0: no floor columns")
    args = p.parse_args(argv)
    with open(args.json) as f:
        data = json.load(f)
    meta, rows = data["meta"], data["rows"]
    copy_tbps = args.copy_tbps
    if copy_tbps is None:
        copy_tbps = (meta.get("copy_gbps") or 0) / 1e3
    print(f"{meta['device_kind']} ({meta['platform']}), jax {meta['jax']}, {meta['date']}, "
          f"{meta['reps']} reps\n")
    conv = [r for r in rows if r["kind"] == "conv"]
    pool = [r for r in rows if r["kind"] == "pool"]
    if conv:
        print("\n".join(conv_table(conv)) + "\n")
    if pool:
        print("\n".join(pool_table(pool, copy_tbps)))


if __name__ == "__main__":
    main()
