"""Data for `simcore grow`: bundled digits, CIFAR pickles (and refusing crafted ones), batches."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from simcore.adapters.torch.experiment.data import (
    UnsafePickleError,
    augment_batch,
    iter_batches,
    load_cifar,
    load_dataset,
    load_digits_dataset,
)


def test_digits_split_is_fixed_by_seed_disjoint_and_stratified():
    a = load_digits_dataset(seed=0)
    b = load_digits_dataset(seed=0)
    c = load_digits_dataset(seed=1)
    assert a.train_images.shape[1:] == (3, 32, 32) and a.train_images.dtype == torch.uint8
    assert a.train_labels.shape[0] + a.test_labels.shape[0] == 1797
    assert torch.equal(a.test_images, b.test_images) and torch.equal(a.test_labels, b.test_labels)
    assert not torch.equal(a.test_labels, c.test_labels)
    # the three channels are copies of one grey image
    assert torch.equal(a.train_images[:, 0], a.train_images[:, 2])
    # no test image is also a training image
    train = {bytes(x.numpy()) for x in a.train_images}
    assert not any(bytes(x.numpy()) in train for x in a.test_images[:50])
    # stratified: every class holds about 25 % of its images in the test split
    for cls in range(10):
        n_test = int((a.test_labels == cls).sum())
        n_all = n_test + int((a.train_labels == cls).sum())
        assert abs(n_test / n_all - 0.25) < 0.02


def _write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=2))


def _cifar_batch(rng, n, label_key, classes, extra=None):
    batch = {b"batch_label": b"testing batch", label_key: [int(v) for v in
                                                           rng.integers(0, classes, n)],
             b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             b"filenames": [f"img_{i}.png".encode() for i in range(n)]}
    batch.update(extra or {})
    return batch


def _cifar10(root, rng, sizes=(3, 2, 2, 2, 2), test=4):
    folder = root / "cifar-10-batches-py"
    batches = [_cifar_batch(rng, n, b"labels", 10) for n in sizes]
    for i, batch in enumerate(batches, start=1):
        _write(folder / f"data_batch_{i}", batch)
    test_batch = _cifar_batch(rng, test, b"labels", 10)
    _write(folder / "test_batch", test_batch)
    return batches, test_batch


def test_cifar10_reads_the_real_layout_pixel_for_pixel(tmp_path):
    rng = np.random.default_rng(0)
    batches, test_batch = _cifar10(tmp_path, rng)
    data = load_cifar(tmp_path, "cifar10")
    expected = np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, 32, 32)
    assert data.num_classes == 10 and data.augment
    assert np.array_equal(data.train_images.numpy(), expected)
    assert data.train_labels.tolist() == sum((b[b"labels"] for b in batches), [])
    assert np.array_equal(data.test_images.numpy(), test_batch[b"data"].reshape(-1, 3, 32, 32))
    # row layout of the files: 1024 red, then 1024 green, then 1024 blue values
    assert data.train_images[0, 1, 0, 0] == batches[0][b"data"][0, 1024]
    # the dataset folder itself is accepted as root too
    again = load_cifar(tmp_path / "cifar-10-batches-py", "cifar10", train_limit=4)
    assert torch.equal(again.train_images, data.train_images[:4])


def test_cifar100_uses_the_fine_labels(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-100-python"
    train = _cifar_batch(rng, 5, b"fine_labels", 100, {b"coarse_labels": [0] * 5})
    test = _cifar_batch(rng, 3, b"fine_labels", 100, {b"coarse_labels": [1] * 3})
    _write(folder / "train", train)
    _write(folder / "test", test)
    data = load_dataset("cifar100", root=str(tmp_path))
    assert data.num_classes == 100
    assert data.train_labels.tolist() == train[b"fine_labels"]
    assert data.test_labels.tolist() == test[b"fine_labels"]


class _RunsCode:
    def __init__(self, sentinel):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


@pytest.mark.parametrize("where", ["top", "inside data"])
def test_a_crafted_pickle_is_refused_and_runs_nothing(tmp_path, where):
    rng = np.random.default_rng(2)
    _cifar10(tmp_path, rng)
    sentinel = tmp_path / "pwned"
    payload = _RunsCode(sentinel)
    if where == "inside data":
        payload = _cifar_batch(rng, 2, b"labels", 10, {b"data": payload})
    _write(tmp_path / "cifar-10-batches-py" / "data_batch_3", payload)
    with pytest.raises(UnsafePickleError, match=r"data_batch_3.*refused global '\w+\.system'"):
        load_cifar(tmp_path, "cifar10")
    assert not sentinel.exists()


def test_other_globals_are_refused_too(tmp_path):
    class Evaluates:
        def __reduce__(self):
            return (eval, ("1 + 1",))

    _write(tmp_path / "cifar-100-python" / "train", Evaluates())
    _write(tmp_path / "cifar-100-python" / "test", {})
    with pytest.raises(UnsafePickleError, match=r"refused global .\w+\.eval."):
        load_cifar(tmp_path, "cifar100")


def test_missing_files_say_where_to_put_them(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_cifar(tmp_path, "cifar10")
    message = str(info.value)
    assert str(tmp_path / "cifar-10-batches-py" / "data_batch_1") in message
    assert "cifar-10-python.tar.gz" in message and "extract" in message
    with pytest.raises(ValueError, match="--data-root"):
        load_dataset("cifar10", root=None)


@pytest.mark.parametrize("change, match", [
    ({b"data": np.zeros((2, 3072), dtype=np.float32)}, "uint8"),
    ({b"data": np.zeros((2, 100), dtype=np.uint8)}, "shape"),
    ({b"labels": [0, 1, 2]}, "3 labels for 2 images"),
    ({b"labels": [0, 10]}, r"labels must lie in \[0, 10\)"),
])
def test_malformed_batches_are_rejected(tmp_path, change, match):
    rng = np.random.default_rng(3)
    _cifar10(tmp_path, rng)
    bad = _cifar_batch(rng, 2, b"labels", 10, change)
    _write(tmp_path / "cifar-10-batches-py" / "test_batch", bad)
    with pytest.raises(ValueError, match=match):
        load_cifar(tmp_path, "cifar10")


def test_augmentation_is_a_padded_crop_possibly_flipped():
    images = torch.arange(2 * 2 * 5 * 5, dtype=torch.float32).reshape(2, 2, 5, 5) + 1
    out = augment_batch(images, torch.Generator().manual_seed(4), padding=2)
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    for k in range(2):
        windows = [padded[k, :, i:i + 5, j:j + 5] for i in range(5) for j in range(5)]
        windows += [w.flip(-1) for w in windows]
        assert any(torch.equal(out[k], w) for w in windows)


def test_skipped_batches_resume_the_same_epoch_exactly():
    data = load_digits_dataset(0, train_limit=40, test_limit=8)
    data = type(data)(**{**data.__dict__, "augment": True})

    def epoch(skip):
        return list(iter_batches(data, "train", 8, generator=torch.Generator().manual_seed(9),
                                 skip=skip))

    full, tail = epoch(0), epoch(2)
    assert len(full) == 5 and len(tail) == 3
    for (x, y), (x2, y2) in zip(full[2:], tail, strict=True):
        assert torch.equal(x, x2) and torch.equal(y, y2)
