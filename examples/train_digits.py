"""Train a small cuda-convnet style network (conv-pool-conv-pool-dense) with jax_convnet.

By default on scikit-learn's bundled handwritten digits (1797 8x8 images, no download),
upsampled to 16x16; with ``--cifar10 DIR`` on the CIFAR-10 python batches you already have
(``data_batch_1`` .. ``data_batch_5`` and ``test_batch``). Runs on the GPU when JAX sees one,
else on the CPU (10-40 s on two cores for the digits, compilation included).

    python examples/train_digits.py --out-dir /tmp/digits
    python examples/train_digits.py --layout C01B --dtype bfloat16
    python examples/train_digits.py --cifar10 ~/data/cifar-10-batches-py --epochs 20

Prints ``test accuracy: 0.XXXX`` at the end and writes ``curves.png`` (loss and accuracy per
epoch) and ``history.json`` into ``--out-dir``. The same ``--seed`` gives the same result on the
same machine: the shuffling comes from a seeded NumPy generator and the initial weights from
``jax.random.key(seed)``.

Needs the ``examples`` extra: ``pip install 'jax_convnet[examples]'``.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import time
from typing import NamedTuple, Sequence

import numpy as np

try:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import optax
    from tqdm.auto import tqdm
except ImportError as e:  # pragma: no cover
    raise SystemExit(f"{e}; this example needs the 'examples' extra: "
                     f"pip install 'jax_convnet[examples]'")

try:
    from jax_convnet.flax import linen as cnn
except ImportError:  # run from a source checkout without installing: use the tree beside us
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from jax_convnet.flax import linen as cnn

DIGITS_DEFAULTS = dict(epochs=15, batch_size=32, lr=2e-3)
CIFAR_DEFAULTS = dict(epochs=20, batch_size=128, lr=1e-3)


# ----------------------------------------------------------------------------- data

class Dataset(NamedTuple):
    """Images NHWC float32 (standardised), labels int32."""
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def _standardize(x_train, x_test):
    """Per-channel mean / std of the training images."""
    mean = x_train.mean(axis=(0, 1, 2), keepdims=True)
    std = x_train.std(axis=(0, 1, 2), keepdims=True) + 1e-6
    return ((x_train - mean) / std).astype(np.float32), ((x_test - mean) / std).astype(np.float32)


def load_digits_data(upsample: int = 2, test_fraction: float = 0.25) -> Dataset:
    """scikit-learn's digits: 1797 8x8 grey images, split into train / test (stratified, fixed:
    the test set does not depend on the seed), upsampled ``upsample`` times (nearest)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.images.astype(np.float32)[..., None] / 16.0  # (N, 8, 8, 1) in [0, 1]
    if upsample > 1:
        x = x.repeat(upsample, axis=1).repeat(upsample, axis=2)
    y = digits.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=0, stratify=y)
    x_train, x_test = _standardize(x_train, x_test)
    return Dataset(x_train, y_train.astype(np.int32), x_test, y_test.astype(np.int32))


CIFAR10_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR10_TEST = "test_batch"


def load_cifar10_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch: a pickled dict with b"data" uint8 (N, 3072) -- the red, green
    and blue 32x32 planes of each image, row-major -- and b"labels". Returns NHWC uint8, int32."""
    with open(path, "rb") as f:
        d = pickle.load(f, encoding="bytes")
    data = np.asarray(d[b"data"] if b"data" in d else d["data"], dtype=np.uint8)
    labels = np.asarray(d[b"labels"] if b"labels" in d else d["labels"], dtype=np.int32)
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise ValueError(f"{path}: expected data (N, 3072) and N labels, got data "
                         f"{data.shape} and {len(labels)} labels")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def load_cifar10(directory: str) -> Dataset:
    """The standard CIFAR-10 python batches in ``directory`` (or its ``cifar-10-batches-py``)."""
    if not os.path.exists(os.path.join(directory, CIFAR10_TEST)):
        nested = os.path.join(directory, "cifar-10-batches-py")
        if os.path.exists(os.path.join(nested, CIFAR10_TEST)):
            directory = nested
    missing = [n for n in CIFAR10_TRAIN + [CIFAR10_TEST]
               if not os.path.exists(os.path.join(directory, n))]
    if missing:
        raise FileNotFoundError(f"--cifar10 {directory}: missing {', '.join(missing)} (expected "
                                f"the CIFAR-10 python batches data_batch_1..5 and test_batch)")
    train = [load_cifar10_batch(os.path.join(directory, n)) for n in CIFAR10_TRAIN]
    x_test, y_test = load_cifar10_batch(os.path.join(directory, CIFAR10_TEST))
    x_train = np.concatenate([x for x, _ in train]).astype(np.float32) / 255.0
    y_train = np.concatenate([y for _, y in train])
    x_train, x_test = _standardize(x_train, x_test.astype(np.float32) / 255.0)
    return Dataset(x_train, y_train, x_test, y_test)


# ----------------------------------------------------------------------------- model

class ConvNet(nn.Module):
    """cuda-convnet style: [conv 5x5 - relu - max pool 3x3/2] x 2, dense - relu - dense.

    Takes NHWC images; in ``layout="C01B"`` they are transposed once to (C, H, W, B) and the
    convolutions and pools run in cuda-convnet's layout."""
    num_classes: int = 10
    features: Sequence[int] = (32, 64)
    hidden: int = 128
    layout: str = "NHWC"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = x.astype(self.dtype)
        if self.layout == "C01B":
            x = jnp.transpose(x, (3, 1, 2, 0))
        for f in self.features:
            x = cnn.Conv(f, (5, 5), padding="SAME", layout=self.layout, dtype=self.dtype)(x)
            x = nn.relu(x)
            x = cnn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME", layout=self.layout)
        if self.layout == "C01B":
            x = jnp.transpose(x, (3, 0, 1, 2))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(self.hidden, dtype=self.dtype)(x))
        return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)


# ----------------------------------------------------------------------------- training

def _loss(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def make_steps(model, optimizer):
    @jax.jit
    def train_step(params, opt_state, x, y):
        def loss_fn(p):
            logits = model.apply(p, x)
            return _loss(logits, y).mean(), logits

        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, loss, jnp.sum(jnp.argmax(logits, -1) == y)

    @jax.jit
    def eval_step(params, x, y, valid):
        logits = model.apply(params, x)
        loss = jnp.sum(jnp.where(valid, _loss(logits, y), 0.0))
        return loss, jnp.sum(jnp.where(valid, jnp.argmax(logits, -1) == y, False))

    return train_step, eval_step


def evaluate(eval_step, params, x, y, batch_size):
    """Mean loss and accuracy over (x, y) in batches of one size (the last one padded)."""
    n = len(x)
    total_loss, correct = 0.0, 0
    for i in range(0, n, batch_size):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        valid = np.ones(batch_size, bool)
        if len(xb) < batch_size:
            pad = batch_size - len(xb)
            valid[len(xb):] = False
            xb = np.concatenate([xb, np.zeros((pad,) + xb.shape[1:], xb.dtype)])
            yb = np.concatenate([yb, np.zeros(pad, yb.dtype)])
        loss, c = eval_step(params, xb, yb, valid)
        total_loss += float(loss)
        correct += int(c)
    return total_loss / n, correct / n


def train(data: Dataset, *, epochs, batch_size, lr, layout="NHWC", dtype="float32", seed=0,
          eval_batch_size=512, progress=True, model_kwargs=None):
    """Trains ConvNet on ``data``; returns (params, history) with per-epoch losses/accuracies."""
    x_train, y_train, x_test, y_test = data
    n_train = len(x_train)
    batch_size = min(batch_size, n_train)
    steps_per_epoch = n_train // batch_size  # the remainder is dropped (reshuffled each epoch)
    total_steps = max(1, epochs * steps_per_epoch)
    eval_batch_size = min(eval_batch_size, max(len(x_test), 1))

    model = ConvNet(num_classes=int(max(y_train.max(), y_test.max())) + 1, layout=layout,
                    dtype=jnp.dtype(dtype), **(model_kwargs or {}))
    params = model.init(jax.random.key(seed), jnp.zeros((1,) + x_train.shape[1:], jnp.float32))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, lr, warmup_steps=min(steps_per_epoch, total_steps // 10 + 1), decay_steps=total_steps,
        end_value=lr * 0.01)
    optimizer = optax.adamw(schedule, weight_decay=1e-4)
    opt_state = optimizer.init(params)
    train_step, eval_step = make_steps(model, optimizer)

    rng = np.random.default_rng(seed)
    history = dict(epoch=[], train_loss=[], train_accuracy=[], test_loss=[], test_accuracy=[],
                   step_loss=[], epoch_seconds=[])
    bar = tqdm(total=total_steps, desc="training", unit="step", disable=not progress,
               dynamic_ncols=True)
    try:
        for epoch in range(1, epochs + 1):
            t0 = time.perf_counter()
            order = rng.permutation(n_train)
            losses, correct = [], 0
            for s in range(steps_per_epoch):
                idx = order[s * batch_size:(s + 1) * batch_size]
                params, opt_state, loss, c = train_step(params, opt_state, x_train[idx],
                                                        y_train[idx])
                losses.append(loss)
                correct += c
                bar.update(1)
            losses = [float(v) for v in losses]  # one sync per epoch, not per step
            test_loss, test_acc = evaluate(eval_step, params, x_test, y_test, eval_batch_size)
            history["epoch"].append(epoch)
            history["train_loss"].append(float(np.mean(losses)))
            history["train_accuracy"].append(int(correct) / (steps_per_epoch * batch_size))
            history["test_loss"].append(test_loss)
            history["test_accuracy"].append(test_acc)
            history["step_loss"].extend(losses)
            history["epoch_seconds"].append(time.perf_counter() - t0)
            bar.set_postfix(epoch=epoch, loss=f"{history['train_loss'][-1]:.3f}",
                            test_acc=f"{test_acc:.4f}")
    finally:
        bar.close()
    return params, history


def plot_history(history, path, title=""):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = history["epoch"]
    steps = np.arange(1, len(history["step_loss"]) + 1) / max(1, len(history["step_loss"])) \
        * len(epochs)
    ax_loss.plot(steps, history["step_loss"], color="tab:blue", alpha=0.25, lw=0.8,
                 label="train (per step)")
    ax_loss.plot(epochs, history["train_loss"], "o-", color="tab:blue", label="train (epoch mean)")
    ax_loss.plot(epochs, history["test_loss"], "s-", color="tab:orange", label="test")
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("cross-entropy loss")
    ax_loss.set_title("loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_acc.plot(epochs, history["train_accuracy"], "o-", color="tab:blue", label="train")
    ax_acc.plot(epochs, history["test_accuracy"], "s-", color="tab:orange", label="test")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy")
    ax_acc.set_title(f"accuracy (final test {history['test_accuracy'][-1]:.4f})")
    ax_acc.set_ylim(min(0.8, min(history["test_accuracy"] + history["train_accuracy"])), 1.0)
    ax_acc.legend(loc="lower right")
    ax_acc.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- command line

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=None,
                   help=f"epochs (default {DIGITS_DEFAULTS['epochs']} for the digits, "
                        f"{CIFAR_DEFAULTS['epochs']} for CIFAR-10)")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"batch size (default {DIGITS_DEFAULTS['batch_size']} / "
                        f"{CIFAR_DEFAULTS['batch_size']})")
    p.add_argument("--lr", type=float, default=None,
                   help=f"peak learning rate of AdamW with warm-up and cosine decay (default "
                        f"{DIGITS_DEFAULTS['lr']} / {CIFAR_DEFAULTS['lr']})")
    p.add_argument("--layout", choices=["NHWC", "C01B"], default="NHWC",
                   help="layout of the convolutions and pools (default NHWC)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="computation dtype; parameters stay float32 (default float32)")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds the shuffling and the initial weights (default 0)")
    p.add_argument("--out-dir", default="train_digits_out",
                   help="where curves.png and history.json go (default ./train_digits_out)")
    p.add_argument("--cifar10", metavar="DIR", default=None,
                   help="train on the CIFAR-10 python batches in DIR instead of the digits")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    t_start = time.perf_counter()
    defaults = CIFAR_DEFAULTS if args.cifar10 else DIGITS_DEFAULTS
    epochs = args.epochs if args.epochs is not None else defaults["epochs"]
    batch_size = args.batch_size if args.batch_size is not None else defaults["batch_size"]
    lr = args.lr if args.lr is not None else defaults["lr"]
    for name, v in (("--epochs", epochs), ("--batch-size", batch_size)):
        if v < 1:
            raise SystemExit(f"{name} must be >= 1, got {v}")

    if args.cifar10:
        data, name = load_cifar10(args.cifar10), "CIFAR-10"
    else:
        data, name = load_digits_data(), "digits"
    dev = jax.devices()[0]
    print(f"{name}: {len(data.x_train)} train / {len(data.x_test)} test images "
          f"{data.x_train.shape[1:]}; device {dev.platform} ({dev.device_kind}); "
          f"layout {args.layout}, {args.dtype}, {epochs} epochs of batch {batch_size}, "
          f"lr {lr}, seed {args.seed}", flush=True)

    params, history = train(data, epochs=epochs, batch_size=batch_size, lr=lr,
                            layout=args.layout, dtype=args.dtype, seed=args.seed,
                            progress=not args.no_progress)
    wall = time.perf_counter() - t_start
    accuracy = history["test_accuracy"][-1]

    os.makedirs(args.out_dir, exist_ok=True)
    png = os.path.join(args.out_dir, "curves.png")
    plot_history(history, png, title=f"jax_convnet ConvNet on {name} ({args.layout}, "
                                     f"{args.dtype}, seed {args.seed})")
    summary = dict(dataset=name, layout=args.layout, dtype=args.dtype, seed=args.seed,
                   epochs=epochs, batch_size=batch_size, lr=lr, device=dev.device_kind,
                   test_accuracy=accuracy, wall_seconds=wall, history=history)
    with open(os.path.join(args.out_dir, "history.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"wall time {wall:.1f} s (first epoch, with compilation: "
          f"{history['epoch_seconds'][0]:.1f} s); curves in {png}")
    print(f"test accuracy: {accuracy:.4f}", flush=True)
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
