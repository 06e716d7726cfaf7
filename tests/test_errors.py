"""Bad input: a ValueError or TypeError at trace time that names the parameter, never a crash."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_convnet as jcn
from conftest import rand

X = rand(0, (3, 10, 9, 5))  # C01B images
W = rand(1, (3, 4, 4, 16))  # C01B filters
H = rand(2, (16, 7, 6, 5))  # filter_acts(X, W)


@pytest.mark.parametrize("kwargs,error,names", [
    (dict(pad=1, padding="SAME"), ValueError, ["pad", "padding"]),
    (dict(pad=-1), ValueError, ["pad"]),
    (dict(pad=1.5), TypeError, ["pad"]),
    (dict(stride=0), ValueError, ["stride"]),
    (dict(stride=(1, 2, 3)), TypeError, ["stride"]),
    (dict(padding="FULL"), ValueError, ["padding"]),
    (dict(padding=((1, 1),)), TypeError, ["padding"]),
    (dict(padding=((1, -1), (0, 0))), ValueError, ["padding"]),
    (dict(layout="NCHW"), ValueError, ["layout"]),
    (dict(partial_sum=5), ValueError, ["partial_sum", "42"]),
    (dict(partial_sum=-2), ValueError, ["partial_sum"]),
    (dict(partial_sum="sometimes"), ValueError, ["partial_sum"]),
    (dict(precision="quadruple"), ValueError, ["precision"]),
])
def test_filter_acts_bad_arguments(kwargs, error, names):
    with pytest.raises(error) as e:
        jcn.filter_acts(X, W, **kwargs)
    for name in names:
        assert name in str(e.value)


@pytest.mark.parametrize("images,filters,error,names", [
    (X[0], W, ValueError, ["images", "rank"]),
    (X, W[..., 0], ValueError, ["filters", "rank"]),
    (X, W.astype(jnp.float16), TypeError, ["images", "filters", "dtype"]),
    (X.astype(jnp.int32), W.astype(jnp.int32), TypeError, ["images", "int32"]),
    (X, rand(3, (4, 4, 4, 16)), ValueError, ["channels", "4", "3"]),
    (rand(4, (3, 3, 3, 5)), W, ValueError, ["larger than the padded image"]),
    ([[1.0]], W, TypeError, ["images"]),
])
def test_filter_acts_bad_operands(images, filters, error, names):
    with pytest.raises(error) as e:
        jcn.filter_acts(images, filters)
    for name in names:
        assert name in str(e.value)


def test_errors_are_raised_at_trace_time():
    with pytest.raises(ValueError, match="stride"):
        jax.jit(lambda x, w: jcn.filter_acts(x, w, stride=0)).lower(X, W)


def test_image_acts_checks_image_shape():
    with pytest.raises(ValueError, match="hid_acts has spatial size"):
        jcn.image_acts(H, W, (20, 20))
    with pytest.raises(ValueError, match="image_shape"):
        jcn.image_acts(H, W, (4, 10, 9, 5))  # 4 channels, filters have 3
    with pytest.raises(TypeError, match="image_shape"):
        jcn.image_acts(H, W, "big")
    with pytest.raises(ValueError, match="hid_acts has 16 channels but there are 8 filters"):
        jcn.image_acts(H, W[..., :8], (10, 9))


def test_weight_acts_checks_filter_shape_and_batch():
    with pytest.raises(ValueError, match="hid_grads has spatial size"):
        jcn.weight_acts(X, H, (3, 3))
    with pytest.raises(ValueError, match="filter_shape"):
        jcn.weight_acts(X, H, (3, 4, 4, 8))
    with pytest.raises(ValueError, match="batch size"):
        jcn.weight_acts(X, H[..., :4], (4, 4))
    with pytest.raises(ValueError, match="partial_sum=5 must divide"):
        jcn.weight_acts(X, H, (4, 4), partial_sum=5)


@pytest.mark.parametrize("args,kwargs,error,names", [
    ((4,), dict(stride=5), ValueError, ["stride", "ds"]),
    ((11,), {}, ValueError, ["ds", "image size"]),
    ((0,), {}, ValueError, ["ds"]),
    ((3,), dict(start=10), ValueError, ["start"]),
    ((3,), dict(start=-1), ValueError, ["start"]),
    ((3,), dict(start=1, padding="SAME"), ValueError, ["start", "padding"]),
    ((3,), dict(padding="CIRCULAR"), ValueError, ["padding"]),
    ((3,), dict(layout="NCHW"), ValueError, ["layout"]),
    (((3, 3, 3),), {}, TypeError, ["ds"]),
    ((3,), dict(start=8, stride=2), ValueError, ["start", "no window"]),
])
def test_max_pool_bad_arguments(args, kwargs, error, names):
    with pytest.raises(error) as e:
        jcn.max_pool(X, *args, **kwargs)
    for name in names:
        assert name in str(e.value)


def test_max_pool_bad_images():
    with pytest.raises(ValueError, match="images must have rank 4"):
        jcn.max_pool(X[0], 2)
    with pytest.raises(TypeError, match="images must be float32"):
        jcn.max_pool(X.astype(jnp.int8), 2)


def test_native_handler_rejects_inconsistent_calls_without_crashing():
    """The C++ handlers re-check what they receive and return an error, never abort (the CUDA
    handlers where the default device is a GPU)."""
    platform = {"gpu": "cuda"}.get(jax.default_backend(), jax.default_backend())
    if not jcn.has_native(platform):  # (also registers its targets, which ffi_call needs)
        pytest.fail(f"native {platform} module missing")
    attrs = jcn.geometry.conv_geometry(
        image_hw=(10, 9), filter_hw=(4, 4), channels=3, filters=16, stride=1, pad=0,
        padding=None, partial_sum=None, layout="C01B", precision=None).ffi_attrs()
    # On the GPU filter_acts' custom call has a second result: its (here empty) workspace.
    workspace = (jax.ShapeDtypeStruct((0,), np.uint8),) if platform == "cuda" else ()

    def filter_acts_call(hidden_shape):
        return jax.ffi.ffi_call("jax_convnet_filter_acts",
                                (jax.ShapeDtypeStruct(hidden_shape, X.dtype), *workspace))

    call = filter_acts_call((16, 5, 5, 5))
    with pytest.raises(Exception, match="hidden spatial size"):
        jax.block_until_ready(call(X, W, **attrs))
    bad = dict(attrs, stride_h=np.int64(0))
    call = filter_acts_call((16, 7, 6, 5))
    with pytest.raises(Exception, match="strides"):
        jax.block_until_ready(call(X, W, **bad))
    pool = jax.ffi.ffi_call("jax_convnet_max_pool", jax.ShapeDtypeStruct((3, 5, 5, 4), X.dtype))
    pattrs = jcn.geometry.pool_geometry((10, 9), 2).ffi_attrs()
    with pytest.raises(Exception, match="batch"):
        jax.block_until_ready(pool(X, **pattrs))
