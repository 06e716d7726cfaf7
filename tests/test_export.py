"""jax.export round trip: a program holding our custom calls is exported, serialized, and called
in a fresh process that only imports jax_convnet (which registers the FFI targets)."""
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import jax_convnet as jcn
from conftest import rand


def net(x, w):
    """filter_acts, max_pool, avg_pool, the response norms, a locally connected layer (with w at
    every position) and their gradients: every target on the CPU but the JVPs."""
    norms = lambda h: jcn.cross_map_norm(jcn.response_norm(h, 3, add_scale=0.1, pow_scale=0.75),
                                         5, add_scale=0.1, pow_scale=0.75)
    local = lambda x, w: jcn.local_filter_acts(x, jnp.broadcast_to(w, (9, 9) + w.shape), pad=1)
    loss = lambda x, w: (jnp.sum(norms(jcn.max_pool(jcn.filter_acts(x, w, pad=1), 3, stride=2))
                                 ** 2) + jnp.sum(jcn.avg_pool(x, 2) ** 2)
                         + jnp.sum(local(x, w) ** 2))
    return loss(x, w), jax.grad(loss, (0, 1))(x, w)


X = rand(0, (3, 9, 9, 4))
W = rand(1, (3, 3, 3, 8))


def test_every_target_is_named_in_the_safety_checks():
    names = {c._impl for c in jcn.export_safety_checks()}
    assert names == {f"custom_call:{t}" for t in jcn.FFI_TARGETS}
    text = jax.jit(lambda x, w: jax.jvp(net, (x, w), (x, w))).lower(X, W).as_text()
    assert {t for t in jcn.FFI_TARGETS if t in text} == set(jcn.FFI_TARGETS)


def test_round_trip_in_a_fresh_process(tmp_path):
    here = {"gpu": "cuda"}.get(jax.default_backend(), jax.default_backend())
    exported = export.export(jax.jit(net), platforms=(here,),
                             disabled_checks=jcn.export_safety_checks())(X, W)
    assert "jax_convnet_filter_acts" in exported.mlir_module()
    (tmp_path / "net.bin").write_bytes(exported.serialize())
    np.savez(tmp_path / "io.npz", x=X, w=W)
    script = textwrap.dedent("""
        import sys
        import jax, numpy as np
        from jax import export
        import jax_convnet  # registers the FFI targets
        io = np.load("io.npz")
        call = export.deserialize(bytearray(open("net.bin", "rb").read())).call
        loss, (dx, dw) = call(io["x"], io["w"])
        np.savez("out.npz", loss=loss, dx=dx, dw=dw)
        """)
    # -P and the temporary directory as cwd: the installed package, not the source tree.
    subprocess.run([sys.executable, "-P", "-c", script], cwd=tmp_path, check=True, timeout=300)
    out = np.load(tmp_path / "out.npz")
    loss, (dx, dw) = net(X, W)
    np.testing.assert_allclose(out["loss"], loss, rtol=1e-5)
    np.testing.assert_allclose(out["dx"], dx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["dw"], dw, rtol=1e-5, atol=1e-5)


def test_export_for_a_platform_without_native_kernels_raises():
    if jcn.has_native("cuda"):
        exported = export.export(jax.jit(net), platforms=("cpu", "cuda"),
                                 disabled_checks=jcn.export_safety_checks())(X, W)
        assert exported.platforms == ("cpu", "cuda")
        return
    with pytest.raises(ValueError, match="cannot export for platform 'cuda'"):
        export.export(jax.jit(net), platforms=("cpu", "cuda"),
                      disabled_checks=jcn.export_safety_checks())(X, W)
    # The explicit switch puts the pure-lax reference on the CUDA side, with a warning.
    jcn._native._warn_missing.cache_clear()
    with jcn.allow_reference_lowering(), pytest.warns(UserWarning, match="unavailable"):
        exported = export.export(jax.jit(net), platforms=("cpu", "cuda"),
                                 disabled_checks=jcn.export_safety_checks())(X, W)
    assert exported.platforms == ("cpu", "cuda")
