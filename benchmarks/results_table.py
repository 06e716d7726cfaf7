"""Markdown tables for benchmarks/RESULTS.md from a ``python -m jax_convnet.benchmark`` JSON file.

    python benchmarks/results_table.py OUT/benchmark.json [MORE.json ...] [--copy-tbps TB/s]
        [--under RATIO] [--merged-out FILE]

Several files (runs of the same kernels, e.g. a table measured in parts) are merged by row name,
later files winning; ``--under 0.333`` lists the rows whose XLA/ours ratio is below it (issue 3's
"within 3x of XLA"), ``--merged-out`` writes the merged rows as one JSON file of the same form.

Pool rows get the bytes each row must move at least (forward: input read + output written;
backward as jax.grad runs it: input and cotangent read, gradient written) and the time that takes
at the card's copy bandwidth: the one the run measured (``copy_gbps`` in the JSON), or
``--copy-tbps`` for older files (the H100 of the first runs: 2.88 TB/s, measured with XLA).
"""
import argparse
import json


def conv_table(rows):
    """With errors against a float64 reference (benchmark --ref-err, f32-highest rows): two more
    columns, ours and XLA's max |y - ref| / max |ref|."""
    ref = any("ref_err" in r for r in rows)
    out = ["| row | ours ms | XLA ms | ours TFLOP/s | XLA TFLOP/s | XLA/ours |"
           + (" ours err vs f64 | XLA err vs f64 |" if ref else ""),
           "|---|---:|---:|---:|---:|---:|" + ("---:|---:|" if ref else "")]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['name']} | error: {r['error'][:60]} | | | | |"
                       + (" | |" if ref else ""))
            continue
        line = (f"| {r['name']} | {r['ms']:.3f} | {r['xla_ms']:.3f} | {r['tflops']:.3g} | "
                f"{r['xla_tflops']:.3g} | {r['ratio']:.2f} |")
        if ref:
            line += (f" {r['ref_err']:.1e} | {r['xla_ref_err']:.1e} |" if "ref_err" in r
                     else " | |")
        out.append(line)
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


def merge(paths):
    """(meta of the first file, with every file's date and args; rows by name, later files
    winning, in first-seen order)."""
    rows, metas = {}, []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        metas.append(data["meta"])
        for r in data["rows"]:
            rows[r["name"]] = r
    meta = dict(metas[0])
    if len(metas) > 1:
        meta["merged_from"] = [{"file": p, "date": m["date"], "args": m.get("args")}
                               for p, m in zip(paths, metas)]
        meta["reps"] = min(m["reps"] for m in metas)
    return meta, list(rows.values())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json", nargs="+")
    p.add_argument("--copy-tbps", type=float, default=None,
                   help="copy bandwidth (read + write) of the card, TB/s (default: the one the "
                        "run measured, if any); 0: no floor columns")
    p.add_argument("--under", type=float, default=None, metavar="RATIO",
                   help="also list the rows whose XLA/ours ratio is below RATIO")
    p.add_argument("--merged-out", default=None, metavar="FILE",
                   help="write the merged rows (several input files) to FILE as JSON")
    args = p.parse_args(argv)
    meta, rows = merge(args.json)
    if args.merged_out:
        with open(args.merged_out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    copy_tbps = args.copy_tbps
    if copy_tbps is None:
        copy_tbps = (meta.get("copy_gbps") or 0) / 1e3
    print(f"{meta['device_kind']} ({meta['platform']}), jax {meta['jax']}, {meta['date']}, "
          f"{meta['reps']} reps" + (f", merged from {len(args.json)} runs" if len(args.json) > 1
                                    else "") + "\n")
    conv = [r for r in rows if r["kind"] == "conv"]
    pool = [r for r in rows if r["kind"] in ("pool", "avgpool")]
    if conv:
        print("\n".join(conv_table(conv)) + "\n")
    if pool:
        print("\n".join(pool_table(pool, copy_tbps)))
    if args.under is not None:
        timed = [r for r in rows if "error" not in r]
        under = [r for r in timed if r["ratio"] < args.under]
        print(f"\n{len(under)} of {len(timed)} rows under {args.under}:")
        for r in under:
            print(f"  {r['name']} {r['ratio']:.2f}")


if __name__ == "__main__":
    main()
