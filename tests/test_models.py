"""jax_convnet.models: cuda-convnet's three classic networks train on our layers, and one training
step of each (small images, few filters) gives the gradients of the same network built from the
pure-lax references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("flax")

from jax_convnet import models as M  # noqa: E402

LAYOUTS = ("NHWC", "C01B")
BATCH = 2
# Reduced networks: (class, image_size, width, classes). AlexNet at 55x55: conv1 12x12, pools to
# 6, 3 and 1.
SMALL = {
    "cifar18": (M.Cifar18, 16, 0.25, 10),
    "alexnet_cmr": (M.AlexNet, 55, 1 / 16, 10),
    "cifar11": (M.Cifar11, 16, 0.25, 10),
}
LEARNING_RATE = 0.01


@pytest.fixture(autouse=True)
def _float32_exact():
    """float32 at full accuracy on every platform (a GPU's default would be TF32), so that ours
    and the reference agree to float32's rounding."""
    with jax.default_matmul_precision("float32"):
        yield


def _batch(model, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(model.input_shape(BATCH), np.float32)
    y = rng.integers(0, model.num_classes, BATCH, dtype=np.int32)
    return jnp.asarray(x), jnp.asarray(y)


def _params(model, seed=1):
    """A parameter tree of the model's shapes, drawn by NumPy (``jax.random`` would compile a
    sampler per shape): kernels N(0, 1 / fan_in), biases N(0, 0.01)."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        shape = leaf.shape
        if jax.tree_util.keystr(path).endswith("['bias']"):
            return jnp.asarray(0.1 * rng.standard_normal(shape, np.float32))
        fan_in = np.prod(shape[2:-1] if len(shape) == 6 else shape[:-1])  # locals: (Ho, Wo, ...)
        return jnp.asarray(rng.standard_normal(shape, np.float32) / np.sqrt(fan_in))
    shapes = jax.eval_shape(model.init, jax.random.key(0),
                            jax.ShapeDtypeStruct(model.input_shape(BATCH), jnp.float32))["params"]
    return jax.tree_util.tree_map_with_path(draw, shapes)


def _sgd_step(loss):
    @jax.jit
    def step(params, x, y):
        value, grads = jax.value_and_grad(loss)(params, x, y)
        return jax.tree.map(lambda p, g: p - LEARNING_RATE * g, params, grads), value, grads
    return step


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", list(SMALL))
def test_a_training_step_gives_the_reference_networks_gradients(name, layout):
    cls, size, width, classes = SMALL[name]
    model = cls(layout=layout, image_size=size, width=width, num_classes=classes)
    x, y = _batch(model)
    params = _params(model)

    ours = _sgd_step(lambda p, x, y: M.cross_entropy(model.apply({"params": p}, x), y))
    reference = _sgd_step(
        lambda p, x, y: M.cross_entropy(M.forward_with(M.REFERENCE_OPS, model, p, x), y))
    new_params, loss, grads = ours(params, x, y)
    _, ref_loss, ref_grads = reference(params, x, y)

    assert np.isfinite(float(loss))
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads),
                            jax.tree.leaves(ref_grads)):
        g, r = np.asarray(g), np.asarray(r)
        scale = np.max(np.abs(r))
        assert scale > 0, f"{jax.tree_util.keystr(path)}: the reference gradient is zero"
        err = np.max(np.abs(g - r)) / scale
        assert err < 1e-4, f"{jax.tree_util.keystr(path)}: gradient error {err:.1e}"
    assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(new_params))


def _param_shapes(model):
    x = jax.ShapeDtypeStruct(model.input_shape(1), jnp.float32)
    tree = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    return {name: {k: v.shape for k, v in p.items()} for name, p in tree.items()}


def test_the_networks_have_the_cfg_files_layers():
    assert M.Cifar18().feature_sizes() == dict(conv1=32, pool1=16, conv2=16, pool2=8, conv3=8,
                                               pool3=4)
    assert M.AlexNet().feature_sizes() == dict(conv1=55, pool1=27, conv2=27, pool2=13, conv3=13,
                                               conv4=13, conv5=13, pool3=6)
    assert M.Cifar11().feature_sizes() == dict(conv1=32, pool1=16, conv2=16, pool2=8, local3=8,
                                               local4=8)

    assert _param_shapes(M.Cifar18(layout="C01B")) == {
        "conv1": dict(kernel=(3, 5, 5, 32), bias=(32,)),
        "conv2": dict(kernel=(32, 5, 5, 32), bias=(32,)),
        "conv3": dict(kernel=(32, 5, 5, 64), bias=(64,)),
        "fc10": dict(kernel=(64 * 4 * 4, 10), bias=(10,))}
    alexnet = _param_shapes(M.AlexNet(layout="NHWC"))
    assert {k: v["kernel"] for k, v in alexnet.items()} == {
        "conv1": (11, 11, 3, 64), "conv2": (5, 5, 64, 192), "conv3": (3, 3, 192, 384),
        "conv4": (3, 3, 384, 256), "conv5": (3, 3, 256, 256), "fc4096a": (256 * 6 * 6, 4096),
        "fc4096b": (4096, 4096), "fc1000": (4096, 1000)}
    cifar11 = _param_shapes(M.Cifar11(layout="NHWC"))
    assert cifar11["local3"] == dict(kernel=(8, 8, 3, 3, 64, 64), bias=(8, 8, 64))
    assert cifar11["local4"] == dict(kernel=(8, 8, 3, 3, 64, 32), bias=(8, 8, 32))
    assert _param_shapes(M.Cifar11(layout="C01B"))["local3"]["kernel"] == (8, 8, 64, 3, 3, 64)


@pytest.mark.parametrize("name", ["alexnet_cmr", "cifar11"])
def test_init_draws_the_cfg_files_initw_and_initb(name):
    """Weights N(0, initW**2), biases initB (AlexNet: 1 on conv2, conv4, conv5 and the hidden fc
    layers, -7 on fc1000); "rbg" keys compile in a second, threefry's in several."""
    cls, size, width, classes = SMALL[name]
    model = cls(layout="C01B", image_size=size, width=width, num_classes=classes)
    x = jnp.zeros(model.input_shape(BATCH), jnp.float32)
    params = jax.jit(model.init)(jax.random.key(0, impl="rbg"), x)["params"]
    specs = {s.name: s for s in model.layers() if hasattr(s, "init_w")}
    assert set(params) == set(specs)
    for layer, spec in specs.items():
        kernel, bias = np.asarray(params[layer]["kernel"]), np.asarray(params[layer]["bias"])
        assert np.std(kernel) == pytest.approx(spec.init_w, rel=0.15), layer
        np.testing.assert_array_equal(bias, spec.init_b, err_msg=layer)
    if name == "alexnet_cmr":
        assert [specs[n].init_b for n in ("conv1", "conv2", "conv3", "fc4096a", "fc1000")] == \
            [0.0, 1.0, 0.0, 1.0, -7.0]


def test_norm_constants_are_the_cfg_scales_after_cuda_convnets_parser():
    """The parser divides the cfg's scale by size (cmrnorm) or size**2 (rnorm)."""
    norms = lambda cls: {s.name: (s.cross_map, s.size, s.add_scale, s.pow, s.min_div)
                         for s in cls().layers() if isinstance(s, M.NormSpec)}
    assert norms(M.Cifar18) == {"rnorm1": (False, 3, pytest.approx(0.00005 / 9), 0.75, 1.0),
                                "rnorm2": (False, 3, pytest.approx(0.00005 / 9), 0.75, 1.0)}
    assert norms(M.AlexNet) == {"rnorm1": (True, 5, pytest.approx(0.0001 / 5), 0.75, 2.0),
                                "rnorm2": (True, 5, pytest.approx(0.0001 / 5), 0.75, 2.0)}
    assert norms(M.Cifar11) == {"rnorm1": (True, 9, pytest.approx(0.001 / 9), 0.75, 1.0),
                                "rnorm2": (True, 9, pytest.approx(0.001 / 9), 0.75, 1.0)}


def test_bad_arguments_raise_naming_them():
    with pytest.raises(ValueError, match="image_size=40 is too small for AlexNet .*pool"):
        M.AlexNet(image_size=40)
    with pytest.raises(ValueError, match="width"):
        M.Cifar18(width=0)
    with pytest.raises(ValueError, match="layout"):
        M.Cifar18(layout="NCHW")
    model = M.Cifar18(image_size=16, width=0.25)
    with pytest.raises(ValueError, match=r"inputs must have shape \('B', 16, 16, 3\)"):
        model.init(jax.random.key(0), jnp.zeros((2, 32, 32, 3)))
