"""The benchmark command: its timing harness really repeats the op, and a run writes its table,
JSON and chart."""
import json
import re

import jax
import jax.numpy as jnp
import pytest
from jax import lax

import jax_convnet as jcn
from jax_convnet import benchmark
from conftest import rand


def test_repeated_calls_survive_compilation():
    # If XLA could drop or merge the repeated calls, per-call times would come out near zero.
    # float32: with x64 on, float64 would lower to XLA on the GPU (our kernels have no float64).
    x = rand(0, (4, 9, 9, 8), jnp.float32)
    pool_grad = lambda x: jax.grad(lambda x: jcn.max_pool(x, 3, stride=2, layout="NHWC").sum())(x)
    compiled = jax.jit(benchmark.repeated(pool_grad, 5)).lower(x).compile()
    # each call: the forward with winners and the gradient
    assert len(re.findall(r"custom[-_]call\(", compiled.as_text())) == 2 * 5
    expected, x_i = pool_grad(x), x
    for _ in range(4):  # each call's input gets the previous output's first element
        x_i = x_i.at[0, 0, 0, 0].set(expected.reshape(-1)[0])
        expected = pool_grad(x_i)
    assert jnp.array_equal(compiled(x), expected)


def test_repeated_calls_cycle_through_argument_copies():
    x, y = (rand(i, (4, 9, 9, 8), jnp.float64) for i in (0, 1))
    pool = lambda x: jcn.max_pool(x, 3, stride=2, layout="NHWC")
    for calls, last in ((5, x), (4, y)):  # call i takes set i % 2
        out = jax.jit(benchmark.repeated(pool, calls, copies=2))(x, y)
        assert jnp.array_equal(out.reshape(-1)[1:], pool(last).reshape(-1)[1:])


def _flops(fn, *args):
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]


@pytest.mark.parametrize("op", ["fprop", "bprop_data", "pool"])
def test_repeated_xla_ops_do_all_their_work(op):
    # XLA's own ops must not be merged (bprop_data does not depend on the images, so calls that
    # differ only there are common subexpressions) nor narrowed to the one element passed on.
    x = rand(0, (4, 16, 16, 8), jnp.float64)
    k = rand(1, (3, 3, 8, 16), jnp.float64)
    conv = lambda x, k: lax.conv_general_dilated(x, k, (1, 1), "VALID",
                                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
    fn, args = {
        "fprop": (conv, (x, k)),
        "bprop_data": (lambda x, k, g: jax.vjp(lambda x: conv(x, k), x)[1](g)[0],
                       (x, k, conv(x, k))),
        "pool": (lambda x: lax.reduce_window(x, -jnp.inf, lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                                             "VALID"), (x,)),
    }[op]
    assert _flops(benchmark.repeated(fn, 4), *args) >= 4 * _flops(fn, *args)


def test_benchmark_command_writes_table_json_and_chart(tmp_path, capsys):
    # One layer's rows: max and average pool, forward, backward and training step, both layouts.
    rows = benchmark.main(["--quick", "--set", "cpu", "--filter", "/pool1/", "--reps", "1",
                           "--out", str(tmp_path)])
    assert {r["kind"] for r in rows} == {"pool", "avgpool"} and len(rows) == 12
    assert all("error" not in r for r in rows)
    # Overlapping windows add their cotangents: XLA's GPU gradient adds in another order.
    assert all(r["ms"] > 0 and r["xla_ms"] > 0 and r["max_rel_err"] < 1e-6 for r in rows)
    printed = capsys.readouterr().out
    assert "XLA/ours" in printed and rows[0]["name"] in printed
    saved = json.loads((tmp_path / "benchmark.json").read_text())
    assert [r["name"] for r in saved["rows"]] == [r["name"] for r in rows]
    assert (tmp_path / "benchmark.png").stat().st_size > 0
    assert saved["meta"]["copy_gbps"] > 0  # pool rows come with the device's copy bandwidth
    assert "copy bandwidth" in printed


def test_copy_bandwidth_counts_bytes_read_and_written(monkeypatch):
    # A fake clock: every timed call of the 8 MiB scale takes 1 ms, so 16 MiB moved -> 16.8 GB/s.
    monkeypatch.setattr(benchmark, "time_fn", lambda compiled, args, **kw: 1.0)
    assert benchmark.measure_copy_gbps(False, reps=1, nbytes=8 << 20) == pytest.approx(16.777216)


def _results_table():
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "results_table.py"
    spec = importlib.util.spec_from_file_location("results_table", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_results_table_merges_runs_and_lists_rows_under_a_ratio(tmp_path, capsys):
    """A table measured in parts: rows merged by name (the later run wins), the rows under a
    ratio listed, the merged rows written back in the benchmark's JSON form."""
    def row(name, ratio):
        return dict(name=name, kind="conv", ms=1.0, xla_ms=ratio, ratio=ratio, tflops=1.0,
                    xla_tflops=ratio)
    meta = dict(device_kind="GPU X", platform="gpu", jax="0", reps=11, args={})
    first, second, merged = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "m.json"
    first.write_text(json.dumps(dict(meta=dict(meta, date="d1"),
                                     rows=[row("conv/A", 0.2), row("conv/B", 0.5)])))
    second.write_text(json.dumps(dict(meta=dict(meta, date="d2", reps=5),
                                      rows=[row("conv/A", 0.4), row("conv/C", 0.1)])))
    _results_table().main([str(first), str(second), "--under", "0.3334",
                           "--merged-out", str(merged)])
    printed = capsys.readouterr().out
    assert "merged from 2 runs" in printed
    assert "1 of 3 rows under 0.3334:\n  conv/C 0.10" in printed  # conv/A is 0.4 now
    saved = json.loads(merged.read_text())
    assert [(r["name"], r["ratio"]) for r in saved["rows"]] == [
        ("conv/A", 0.4), ("conv/B", 0.5), ("conv/C", 0.1)]
    assert saved["meta"]["reps"] == 5
    assert [m["date"] for m in saved["meta"]["merged_from"]] == ["d1", "d2"]


def test_conv_rows_report_their_error_against_a_float64_reference(tmp_path, capsys):
    """--ref-err: ours and XLA's results against XLA's float64 convolution, in the row, the
    printed table and the RESULTS.md table (float32: within float32 rounding on the CPU, TF32's
    on a GPU)."""
    rows = benchmark.main(["--quick", "--set", "cpu", "--ops", "conv", "--filter", "fprop/f32/NHWC",
                           "--reps", "1", "--ref-err", "--out", str(tmp_path)])
    assert rows and all("error" not in r for r in rows)
    bound = 1e-5 if jax.default_backend() == "cpu" else 1e-2
    assert all(0 < r["ref_err"] < bound and 0 < r["xla_ref_err"] < bound for r in rows)
    assert all([c["op"] for c in r["paths"]] == ["filter_acts"] for r in rows)  # jcn.explain's
    assert "vs float64: ours" in capsys.readouterr().out
    _results_table().main([str(tmp_path / "benchmark.json")])
    assert "ours err vs f64 | XLA err vs f64 |" in capsys.readouterr().out


# Each row costs seconds on the CPU, so not every (net, dtype, layout): every pair of net, dtype
# and layout once (the ops themselves are tested in every dtype and layout), and one net and
# dtype in both layouts (XLA's best layout).
NET_ROWS = {"net/alexnet/bf16/C01B", "net/alexnet/f32/NHWC", "net/cifar10/bf16/NHWC",
            "net/cifar10/f32/C01B", "net/cifar10/f32/NHWC"}
# jax_convnet.models' networks: each dtype and layout once, the locally connected layers in both
# layouts.
MODEL_NET_ROWS = {"net/cifar18/bf16/C01B", "net/alexnet_cmr/f32/NHWC", "net/cifar11/f32/C01B",
                  "net/cifar11/bf16/NHWC"}


def test_nets_time_every_training_step_after_checking_it_against_xla(tmp_path, capsys):
    """--nets at a tiny size (batch 2, the AlexNets on 55x55 images): each net, dtype and layout
    of NET_ROWS and MODEL_NET_ROWS gets a row whose two steps agreed on loss and update before
    both were timed."""
    filters = sorted(NET_ROWS | MODEL_NET_ROWS)
    benchmark.main(["--nets", "--batch", "2", "--alexnet-size", "55", "--reps", "1",
                    "--out", str(tmp_path), *(a for f in filters for a in ("--filter", f))])
    saved = json.loads((tmp_path / "nets.json").read_text())
    rows = saved["rows"]
    expected = NET_ROWS | MODEL_NET_ROWS
    assert {r["name"] for r in rows} == expected and len(rows) == len(expected)
    assert {r["name"] for r in benchmark.net_rows()} >= expected
    for r in rows:
        assert "error" not in r, r
        assert r["ms"] > 0 and r["xla_ms"] > 0
        assert r["ratio"] == pytest.approx(r["xla_ms"] / r["ms"])
        best = min(s["xla_ms"] for s in rows if (s["net"], s["config"]) == (r["net"], r["config"]))
        assert r["ratio_best"] == pytest.approx(best / r["ms"])
        # The CPU's float32 is exact; a GPU's float32 steps are first checked at precision highest.
        assert [c["precision"] for c in r["checks"]] == (
            ["highest", "default"] if jax.default_backend() != "cpu" and r["config"] == "f32"
            else ["default"])
        for check in r["checks"]:
            loss_bound, update_bound = check["bounds"]
            assert check["loss_rel_err"] <= loss_bound
            assert 0 < check["update_rel_err"] <= update_bound
        assert r["jax"] == jax.__version__ and r["device_kind"] == jax.devices()[0].device_kind
        assert (r["batch"], r["image_size"]) == (2, 55 if r["net"].startswith("alexnet") else 32)
    printed = capsys.readouterr().out
    assert "XLA best/ours" in printed and "alexnet     bf16  C01B" in printed


def test_nets_check_catches_a_different_network(monkeypatch):
    """XLA's convolutions with flipped filters (convolution instead of cross-correlation): same
    shapes, different network, and the row reports the disagreement instead of times."""
    from jax_convnet import _nets
    conv = _nets._conv

    def flipped_for_xla(ops, h, w, c, layout):
        if ops == "xla":
            ax = jcn.geometry.filter_axes(layout)
            w = jnp.flip(w, (ax["h"], ax["w"]))
        return conv(ops, h, w, c, layout)
    monkeypatch.setattr(_nets, "_conv", flipped_for_xla)
    (row,) = benchmark.net_rows(batch=2, filters=["net/cifar10/f32/NHWC"])
    r = benchmark.run_net_row(row, gpu=False, reps=1, inner=1)
    assert "disagree" in r["error"] and "ms" not in r
    assert r["update_rel_err"] > 10 * r["checks"][0]["bounds"][1]


def test_nets_check_float32_at_precision_highest_first_where_the_device_may_use_tf32():
    """The GPU's sequence (run here on the default device): float32 steps compiled at precision
    highest within the GPU's float32 bounds, then the timed steps within TF32's."""
    (row,) = benchmark.net_rows(batch=2, filters=["net/cifar10/f32/C01B"])
    r = benchmark.run_net_row(row, gpu=True, reps=1, inner=1)
    assert "error" not in r and r["ms"] > 0 and r["xla_ms"] > 0
    assert [(c["precision"], c["bounds"]) for c in r["checks"]] == [
        ("highest", list(benchmark.NET_TOLERANCE["f32-gpu"])),
        ("default", list(benchmark.NET_TOLERANCE["tf32"]))]
    assert all(c["update_rel_err"] <= c["bounds"][1] for c in r["checks"])


def test_nets_compute_the_specified_networks():
    """Full size: AlexNet's dense layer takes 256x6x6 features, the CIFAR-10 net's 64x4x4 (the
    ceil rule's 32 -> 16 -> 8 -> 4, XLA's pools padded to match); both variants, both layouts."""
    from jax_convnet import _nets
    assert _nets.feature_sizes(_nets.NETS["alexnet"]) == [27, 13, 13, 13, 6]
    assert _nets.feature_sizes(_nets.NETS["cifar10"]) == [16, 8, 4]
    for net, classes in ((_nets.NETS["alexnet"], 1000), (_nets.NETS["cifar10"], 10)):
        for layout in ("NHWC", "C01B"):
            params = [jax.ShapeDtypeStruct(s, jnp.float32)
                      for s in _nets.param_shapes(net, layout)]
            x = jax.ShapeDtypeStruct(jcn.geometry.image_shape(layout, 128, 3, net.image_size,
                                                              net.image_size), jnp.float32)
            for ops in _nets.OPS:
                out = jax.eval_shape(lambda p, x: _nets.forward(p, x, net, ops=ops, layout=layout,
                                                                dtype=jnp.bfloat16), params, x)
                assert out.shape == (128, classes) and out.dtype == jnp.float32
    with pytest.raises(ValueError, match="image_size=50 is too small for alexnet"):
        benchmark.net_rows(alexnet_size=50)


def test_nets_time_the_cfg_networks_of_jax_convnet_models():
    """Full size: the map sizes of cuda-convnet's cfg files; our Flax module's step and the step
    on XLA's ops take the same parameter tree and give float32 logits of the classes."""
    from jax_convnet import _nets
    assert _nets.feature_sizes(_nets.MODEL_NETS["cifar18"]) == [32, 16, 16, 8, 8, 4]
    assert _nets.feature_sizes(_nets.MODEL_NETS["alexnet_cmr"]) == [55, 27, 27, 13, 13, 13, 13, 6]
    assert _nets.feature_sizes(_nets.MODEL_NETS["cifar11"]) == [32, 16, 16, 8, 8, 8]
    for net in _nets.MODEL_NETS.values():
        for layout in ("NHWC", "C01B"):
            model = net.model(layout, jnp.bfloat16)
            x = jax.ShapeDtypeStruct(model.input_shape(128), jnp.float32)
            params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
            y = jax.ShapeDtypeStruct((128,), jnp.int32)
            for ops in _nets.OPS:
                step = _nets.train_step(net, ops=ops, layout=layout, dtype=jnp.bfloat16)
                new_params, loss = jax.eval_shape(step, params, x, y)
                assert jax.tree.map(lambda a: (a.shape, a.dtype), new_params) == \
                    jax.tree.map(lambda a: (a.shape, a.dtype), params)
                assert loss.shape == () and loss.dtype == jnp.float32
    with pytest.raises(ValueError, match="image_size=51 is too small for AlexNet"):
        benchmark.net_rows(alexnet_size=51)


def test_help_says_each_default_once(capsys):
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--help"])
    options = re.split(r"\n  (?=-)", capsys.readouterr().out)
    assert len(options) > 10
    for text in options:
        assert text.lower().count("default") <= 1, text


def test_local_rows_time_the_11pct_layers_against_lax_local(tmp_path):
    """--ops local: the CIFAR-10 11% net's locally connected layers, fprop / bprop_data /
    bprop_filter of ours against lax.conv_general_dilated_local, equal within float32 rounding
    (on the CPU), with their float64 errors."""
    rows = benchmark.main(["--set", "cpu", "--ops", "local", "--filter", "local4/", "--batch", "4",
                           "--reps", "1", "--ref-err", "--out", str(tmp_path)])
    assert {r["name"] for r in rows} == {f"local/local4/{op}/f32/{layout}"
                                         for layout in ("NHWC", "C01B")
                                         for op in ("fprop", "bprop_data", "bprop_filter")}
    assert all("error" not in r and r["ms"] > 0 and r["tflops"] > 0 for r in rows)
    bound = 1e-5 if jax.default_backend() == "cpu" else 1e-2
    assert all(r["max_rel_err"] < bound and r["ref_err"] < bound for r in rows)


def test_groups_rows_time_alexnets_two_group_layers_against_xla(tmp_path):
    """--ops groups: AlexNet's two-group layers (CPU-sized here), fprop / bprop_data /
    bprop_filter of filter_acts(groups=2) against lax's feature_group_count=2, equal within
    float32 rounding, with their float64 errors; the flop count is the grouped one."""
    rows = benchmark.main(["--set", "cpu", "--ops", "groups", "--quick", "--filter", "alex5g/",
                           "--batch", "2", "--reps", "1", "--ref-err", "--out", str(tmp_path)])
    assert {r["name"] for r in rows} == {f"groups/alex5g/{op}/f32/{layout}"
                                         for layout in ("NHWC", "C01B")
                                         for op in ("fprop", "bprop_data", "bprop_filter")}
    assert all("error" not in r and r["ms"] > 0 and r["tflops"] > 0 for r in rows)
    # batch 2, 96 channels in 2 groups, 64 filters, 3x3 on 13x13 (pad 1)
    assert all(r["flop"] == 2 * 2 * 64 * 13 * 13 * 48 * 9 for r in rows)
    bound = 1e-5 if jax.default_backend() == "cpu" else 1e-2
    assert all(r["max_rel_err"] < bound and r["ref_err"] < bound for r in rows)
    # each row's conv calls (the op's, then its gradient's) with their workspace paths
    assert all(r["paths"] and r["paths"][0]["op"] == "filter_acts" for r in rows)
