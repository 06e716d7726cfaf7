"""Shared test helpers: random operands (never zeros), tolerances by dtype, device selection, the
GPU tests' oracle (the reference in float64 on the CPU) and their poisoned, repeated runs."""
import os
import re
import subprocess
import sys

# The test workers share a GPU: each allocates what it needs instead of most of the memory.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# pytest-xdist's workers start in the repository root with it on sys.path; the tests import the
# installed package (which holds the compiled modules), never the source tree.
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _REPO_ROOT]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", True)

import jax_convnet as jcn  # noqa: E402

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16, jnp.float64]
LAYOUTS = ["C01B", "NHWC"]

# Relative (to the reference's largest magnitude) error allowed per dtype.
TOLERANCE = {jnp.float64: 1e-12, jnp.float32: 2e-5, jnp.float16: 4e-3, jnp.bfloat16: 2e-2}


def has_gpu():
    try:
        return any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        return False


def rand(seed, shape, dtype=jnp.float32):
    """Standard normal data of ``dtype``: never zeros, so unwritten outputs and bad indexing show.
    Drawn with NumPy (``seed``: an int or a jax key): jax.random would compile for every shape."""
    if not isinstance(seed, (int, np.integer)):
        seed = np.asarray(jax.random.key_data(seed)).astype(np.uint64)
    x = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
    return jnp.asarray(x.astype(jnp.dtype(dtype)))


def assert_close(actual, expected, dtype=None, *, scale=1.0):
    """Max error relative to the reference's largest magnitude, per dtype."""
    dtype = dtype or expected.dtype
    actual = np.asarray(actual).astype(np.float64)  # in NumPy: no compilation per shape
    expected = np.asarray(expected).astype(np.float64)
    assert actual.shape == expected.shape
    assert np.all(np.isfinite(actual)), "non-finite values in the result"
    denom = max(np.max(np.abs(expected)), 1e-30)
    err = np.max(np.abs(actual - expected)) / denom
    tol = TOLERANCE[jnp.dtype(dtype).type] * scale
    assert err <= tol, f"relative error {err:.3g} > {tol:.3g}"


def assert_close_sum(actual, expected, terms_magnitude, dtype=jnp.float32):
    """A sum of many terms (a loss such as vdot(y, g)) against its reference, relative to the sum
    of the terms' magnitudes: two summation orders differ by rounding of that size, however
    much the terms cancel."""
    err = abs(float(actual) - float(expected)) / max(float(terms_magnitude), 1e-30)
    tol = TOLERANCE[jnp.dtype(dtype).type]
    assert err <= tol, f"relative error {err:.3g} > {tol:.3g}"


def tolerance_dtype(dtype, precision=None):
    """The dtype whose TOLERANCE judges a GPU result of ``dtype`` at ``precision``: float32 at
    default precision may run as TF32, which keeps 10 mantissa bits, so bfloat16's bound."""
    if jnp.dtype(dtype) == jnp.float32 and precision in (None, "default"):
        return jnp.bfloat16
    return dtype


def images(key, layout, n, c, h, w, dtype=jnp.float32):
    return rand(key, jcn.geometry.image_shape(layout, n, c, h, w), dtype)


def filters(key, layout, f, c, h, w, dtype=jnp.float32):
    return rand(key, jcn.geometry.filter_shape(layout, f, c, h, w), dtype)


def hlo_text(fn, *args):
    return jax.jit(fn).lower(*args).as_text()


def value_jvp_vjp(f):
    """(x, t, g) -> f(x), its JVP along t and its VJP of g, in one compiled function."""
    def run(x, t, g):
        y, ty = jax.jvp(f, (x,), (t,))
        return y, ty, jax.vjp(f, x)[1](g)[0]
    return jax.jit(run)


def gpu():
    return jax.devices("gpu")[0]


def cpu():
    return jax.devices("cpu")[0]


def exact(*arrays):
    """The oracle's operands: float64 copies on the CPU, where the pure-lax reference is exact
    enough to judge any kernel (XLA's float32 convolutions on the GPU are not)."""
    return jax.device_put([a.astype(jnp.float64) for a in arrays], cpu())


def run_poisoned(fn, *args):
    """Runs ``fn`` right after NaN-filled buffers of its outputs' sizes were freed, so an allocator
    that hands the same memory back makes any element the kernel fails to write show as NaN."""
    for s in jax.tree_util.tree_leaves(jax.eval_shape(fn, *args)):
        jax.block_until_ready(jax.device_put(np.full(s.shape, np.nan, s.dtype))).delete()
    return fn(*args)


def run_poisoned_twice(fn, *args):
    """``run_poisoned`` twice, asserting the two results equal bit for bit (no atomics, no
    races); returns the first."""
    first = run_poisoned(fn, *args)
    again = run_poisoned(fn, *args)
    for a, b in zip(jax.tree_util.tree_leaves(first), jax.tree_util.tree_leaves(again)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    return first


@pytest.fixture(params=["cpu", "gpu"])
def platform(request):
    """Runs the test on the CPU kernels, and again on the CUDA kernels where a GPU is present."""
    if request.param == "gpu":
        if not has_gpu():
            pytest.skip("needs an NVIDIA GPU")
        if not jcn.has_native("cuda"):
            pytest.fail("a GPU is present but the CUDA module did not load")
        # float32 at full accuracy here; the TF32 path has its own tolerance in test_gpu.py.
        with jax.default_device(jax.devices("gpu")[0]), jax.default_matmul_precision("float32"):
            yield request.param
    else:
        with jax.default_device(jax.devices("cpu")[0]):
            yield request.param


@pytest.fixture(autouse=True)
def _gpu_marker(request):
    """Tests marked gpu skip cleanly without a GPU, and fail loudly if the CUDA module is missing."""
    if request.node.get_closest_marker("gpu"):
        if not has_gpu():
            pytest.skip("needs an NVIDIA GPU")
        if not jcn.has_native("cuda"):
            pytest.fail("a GPU is present but the CUDA module did not load")
    yield


def run_in_cpu_devices(test_file, n_devices):
    """Runs the test file again in a subprocess with ``n_devices`` virtual CPU devices and no other
    platform (XLA reads the flag once, before the first device is created) and asserts that its
    tests passed; in that subprocess the call skips."""
    if len(jax.devices("cpu")) >= n_devices:
        pytest.skip(f"this is the {n_devices}-device run")
    flags = (os.environ.get("XLA_FLAGS", "")
             + f" --xla_force_host_platform_device_count={n_devices}")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.basename(test_file)],
        cwd=os.path.dirname(os.path.abspath(test_file)),
        env=dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu"),
        capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert re.search(r"\b[1-9]\d* passed", done.stdout), done.stdout[-2000:]


FOUR_DEVICES = 4


@pytest.fixture
def mesh():
    """A 2 x 2 ("data", "model") mesh of four CPU devices: in the subprocess that
    run_in_cpu_devices(__file__, FOUR_DEVICES) starts; skipped elsewhere."""
    devices = jax.devices("cpu")
    if len(devices) < FOUR_DEVICES:
        pytest.skip("needs four CPU devices (run through test_in_four_cpu_devices)")
    return jax.sharding.Mesh(np.array(devices[:FOUR_DEVICES]).reshape(2, 2), ("data", "model"))


def one_device(fn, *args):
    """``fn`` on its arguments put on one CPU device: the unsplit reference of a split run."""
    return fn(*jax.device_put(args, jax.devices("cpu")[0]))


def spec_of(x):
    """The PartitionSpec of ``x``'s sharding, padded with None to its rank."""
    spec = tuple(x.sharding.spec)
    return spec + (None,) * (x.ndim - len(spec))


def check_batch_split_step(step, split_images, *args):
    """``step`` (a jitted value_and_grad over images and the rest of ``args``) on images split
    over the mesh's "data" axis equals it on one device; the image gradient stays split. Returns
    the compiled program's text for the caller's collective checks."""
    value, grads = step(split_images, *args[1:])
    want_value, want_grads = one_device(step, *args)
    assert_close(value, want_value, jnp.float32)
    for g, want in zip(grads, want_grads):
        assert_close(g, want, jnp.float32)
    assert spec_of(grads[0]) == spec_of(split_images)  # the image gradient stays split
    return step.lower(split_images, *args[1:]).compile().as_text()


def check_all_three(x, w, dtype=None, *, family="", **kw):
    """Our filter_acts, image_acts and weight_acts (outputs poisoned first) equal the
    reference's on these operands and on random cotangents; ``family="local_"`` checks the
    locally connected ops instead; ``kw`` as the ops take it."""
    ours, ref = ({name: getattr(module, family + name)
                  for name in ("filter_acts", "image_acts", "weight_acts")}
                 for module in (jcn, jcn.reference))
    # The reference under jit: one compilation instead of one per operation.
    y = run_poisoned(lambda x, w: ours["filter_acts"](x, w, **kw), x, w)
    assert_close(y, jax.jit(lambda x, w: ref["filter_acts"](x, w, **kw))(x, w), dtype)
    g = rand(7, y.shape, x.dtype)
    dx = run_poisoned(lambda g, w: ours["image_acts"](g, w, x.shape, **kw), g, w)
    assert_close(dx, jax.jit(lambda g, w: ref["image_acts"](g, w, x.shape, **kw))(g, w), dtype)
    dw = run_poisoned(lambda x, g: ours["weight_acts"](x, g, w.shape, **kw), x, g)
    assert_close(dw, jax.jit(lambda x, g: ref["weight_acts"](x, g, w.shape, **kw))(x, g), dtype)
    return y
