"""examples/train_digits.py: the CIFAR-10 loader on tiny files in the standard format, and short
end-to-end training runs (digits and tiny CIFAR-10; NHWC and C01B; determinism of a seed)."""
import importlib.util
import json
import os
import pickle
import re
import sys

import numpy as np
import pytest

pytest.importorskip("flax")
pytest.importorskip("optax")
pytest.importorskip("tqdm")
pytest.importorskip("matplotlib")

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "examples", "train_digits.py")


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("train_digits_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses (flax modules) look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def _write_batch(path, images_nhwc, labels):
    """The CIFAR-10 python format: b"data" uint8 (N, 3072) as R, G, B planes, b"labels"."""
    data = images_nhwc.transpose(0, 3, 1, 2).reshape(len(images_nhwc), 3072)
    with open(path, "wb") as f:
        pickle.dump({b"batch_label": b"tiny", b"labels": [int(v) for v in labels],
                     b"data": data, b"filenames": [b"x.png"] * len(labels)}, f)


@pytest.fixture(scope="module")
def tiny_cifar(tmp_path_factory):
    """6 files of 8 images each; the class is encoded in the image so a net can learn it."""
    root = tmp_path_factory.mktemp("cifar") / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    batches = {}
    for name in names:
        labels = rng.integers(0, 10, 8)
        images = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
        for img, lab in zip(images, labels):
            img[:, :, lab % 3] = 25 * lab
        _write_batch(root / name, images, labels)
        batches[name] = (images, labels)
    return root, batches


def test_cifar10_batch_layout(example, tmp_path):
    """Rows are R, G, B planes of 32x32 row-major pixels; the loader gives NHWC."""
    img = np.zeros((1, 32, 32, 3), np.uint8)
    img[0, 1, 2] = (10, 20, 30)  # row 1, col 2
    img[0, 31, 0] = (1, 2, 3)
    _write_batch(tmp_path / "b", img, [7])
    with open(tmp_path / "b", "rb") as f:
        raw = pickle.load(f)[b"data"][0]
    assert (raw[1 * 32 + 2], raw[1024 + 1 * 32 + 2], raw[2048 + 1 * 32 + 2]) == (10, 20, 30)
    x, y = example.load_cifar10_batch(str(tmp_path / "b"))
    assert x.shape == (1, 32, 32, 3) and x.dtype == np.uint8
    np.testing.assert_array_equal(x, img)
    assert y.tolist() == [7] and y.dtype == np.int32


def test_cifar10_loader(example, tiny_cifar):
    root, batches = tiny_cifar
    for directory in (root, root.parent):  # the folder itself or the folder holding it
        data = example.load_cifar10(str(directory))
        assert data.x_train.shape == (40, 32, 32, 3) and data.x_test.shape == (8, 32, 32, 3)
        assert data.x_train.dtype == data.x_test.dtype == np.float32
        assert data.y_train.dtype == data.y_test.dtype == np.int32
        expected = np.concatenate([batches[f"data_batch_{i}"][1] for i in range(1, 6)])
        np.testing.assert_array_equal(data.y_train, expected)
        np.testing.assert_array_equal(data.y_test, batches["test_batch"][1])
        # standardised per channel on the training set
        np.testing.assert_allclose(data.x_train.mean(axis=(0, 1, 2)), 0, atol=1e-4)
        np.testing.assert_allclose(data.x_train.std(axis=(0, 1, 2)), 1, atol=1e-3)
        # same pixel order as the files
        raw = batches["data_batch_1"][0].astype(np.float64)
        corr = np.corrcoef(raw[..., 0].ravel(), data.x_train[:8, ..., 0].ravel())[0, 1]
        assert corr > 0.999


def test_cifar10_missing_files(example, tmp_path):
    _write_batch(tmp_path / "data_batch_1", np.zeros((1, 32, 32, 3), np.uint8), [0])
    with pytest.raises(FileNotFoundError, match="data_batch_2.*test_batch"):
        example.load_cifar10(str(tmp_path))


def _accuracy_line(out):
    lines = [l for l in out.splitlines() if l.startswith("test accuracy:")]
    assert len(lines) == 1, out
    assert re.fullmatch(r"test accuracy: [01]\.\d{4}", lines[0]), lines[0]
    return float(lines[0].split(":")[1])


def test_train_cifar10_tiny_end_to_end(example, tiny_cifar, tmp_path, capsys):
    root, _ = tiny_cifar
    argv = ["--cifar10", str(root), "--epochs", "2", "--batch-size", "8", "--seed", "3",
            "--no-progress"]
    first = example.main(argv + ["--out-dir", str(tmp_path / "a")])
    acc = _accuracy_line(capsys.readouterr().out)
    assert acc == pytest.approx(first["test_accuracy"], abs=1e-4)
    assert os.path.getsize(tmp_path / "a" / "curves.png") > 1000
    with open(tmp_path / "a" / "history.json") as f:
        saved = json.load(f)
    assert saved["dataset"] == "CIFAR-10" and len(saved["history"]["test_accuracy"]) == 2
    assert len(saved["history"]["step_loss"]) == 2 * 5
    # the same seed gives the same run
    second = example.main(argv + ["--out-dir", str(tmp_path / "b")])
    assert second["history"]["step_loss"] == first["history"]["step_loss"]
    assert second["test_accuracy"] == first["test_accuracy"]


def test_train_digits_one_epoch(example, tmp_path, capsys):
    result = example.main(["--epochs", "1", "--batch-size", "64", "--no-progress",
                           "--out-dir", str(tmp_path)])
    acc = _accuracy_line(capsys.readouterr().out)
    assert result["dataset"] == "digits"
    assert np.isfinite(result["history"]["train_loss"][0])
    assert acc > 0.5  # one epoch of 21 steps is already far above chance
    assert os.path.exists(tmp_path / "curves.png")


def test_train_c01b_bfloat16(example, tiny_cifar, tmp_path, capsys):
    root, _ = tiny_cifar
    result = example.main(["--cifar10", str(root), "--epochs", "1", "--batch-size", "16",
                           "--layout", "C01B", "--dtype", "bfloat16", "--no-progress",
                           "--out-dir", str(tmp_path)])
    _accuracy_line(capsys.readouterr().out)
    assert result["layout"] == "C01B" and result["dtype"] == "bfloat16"
    assert np.isfinite(result["history"]["train_loss"][0])
