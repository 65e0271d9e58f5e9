"""Datasets for ``simcore grow``: scikit-learn's bundled digits (no download) and local CIFAR.

Every dataset is held as ``uint8`` images ``(N, 3, 32, 32)`` with integer
labels, plus the per-channel mean and std used to normalise a batch. Batches
are cut, augmented (CIFAR: random 32x32 crop of the 4-pixel zero-padded image
and a horizontal flip) and normalised with torch ops on the training device;
every random choice comes from an explicit ``torch.Generator`` so that a run
can be replayed exactly (the runner seeds one per epoch).

CIFAR files are Python pickles, and unpickling can run arbitrary code; they are
read with :func:`simcore.experiment.cifar.restricted_load`, which runs nothing
(its names are re-exported here).

>>> data = load_digits_dataset(seed=0, train_limit=100, test_limit=20)
>>> data.train_images.shape, data.train_images.dtype, data.num_classes
(torch.Size([100, 3, 32, 32]), torch.uint8, 10)
>>> import torch
>>> x, y = next(iter_batches(data, "train", 32, generator=torch.Generator().manual_seed(0)))
>>> x.shape, x.dtype, y.shape
(torch.Size([32, 3, 32, 32]), torch.float32, torch.Size([32]))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from simcore.extend import check_int

from .cifar import RestrictedUnpickler, UnsafePickleError, restricted_load

__all__ = [
    "CIFAR_URL",
    "DATASETS",
    "ImageDataset",
    "RestrictedUnpickler",
    "UnsafePickleError",
    "augment_batch",
    "hold_out_validation",
    "iter_batches",
    "load_cifar",
    "load_dataset",
    "load_digits_dataset",
    "restricted_load",
]

DATASETS = ("digits", "cifar10", "cifar100")
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
IMAGE_SIZE = 32
_CIFAR_PIXELS = 3 * IMAGE_SIZE * IMAGE_SIZE


_SPLITS = ("train", "val", "test")


#: One value per colour channel (the per-channel mean and std of a dataset).
RGB = tuple[float, float, float]


def _no_images() -> torch.Tensor:
    return torch.zeros((0, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8)


@dataclass(frozen=True)
class ImageDataset:
    """Train/validation/test images (``uint8``, ``(N, 3, 32, 32)``), labels (``int64``).

    The validation split is held out of the training data
    (:func:`hold_out_validation`); it is empty unless one was asked for. Model
    choices (the N sweep) read it, never the test split.
    """

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int
    mean: RGB
    std: RGB
    augment: bool
    val_images: torch.Tensor = dataclasses.field(default_factory=_no_images)
    val_labels: torch.Tensor = dataclasses.field(
        default_factory=lambda: torch.zeros(0, dtype=torch.int64))

    @property
    def has_validation(self) -> bool:
        return self.val_labels.shape[0] > 0

    def to(self, device: torch.device | str) -> ImageDataset:
        """The same dataset with its tensors on ``device`` (a copy only if the device differs)."""
        move = {f"{split}_{kind}": getattr(self, f"{split}_{kind}").to(device)
                for split in _SPLITS for kind in ("images", "labels")}
        return dataclasses.replace(self, **move)


def hold_out_validation(dataset: ImageDataset, fraction: float, seed: int) -> ImageDataset:
    """``dataset`` with a stratified ``fraction`` of its training images moved to validation.

    Every class gives the same share (rounded), drawn with ``seed``; the
    normalisation statistics are recomputed on what is left for training. The
    test split is untouched. ``fraction=0`` returns ``dataset`` unchanged.

    >>> data = hold_out_validation(load_digits_dataset(0), 0.1, seed=0)
    >>> data.train_labels.shape[0], data.val_labels.shape[0], data.test_labels.shape[0]
    (1211, 136, 450)
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
        raise TypeError(f"fraction must be a float, got {type(fraction).__name__}")
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"the validation fraction must lie in [0, 1), got {fraction}")
    if fraction == 0.0:
        return dataset
    if dataset.has_validation:
        raise ValueError("the dataset already has a validation split")
    labels = dataset.train_labels.cpu().numpy()
    rng = np.random.default_rng([int(seed), 5])
    val_parts = []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        # at least one image of every class that has two (tiny subsets still validate)
        count = int(round(len(members) * fraction))
        val_parts.append(members[:max(count, 1) if len(members) > 1 else count])
    val_idx = np.sort(np.concatenate(val_parts))
    keep = np.setdiff1d(np.arange(labels.shape[0]), val_idx)
    if keep.size == 0 or val_idx.size == 0:
        raise ValueError(f"a validation fraction of {fraction} leaves an empty split "
                         f"({labels.shape[0]} training images)")
    keep_t, val_t = torch.as_tensor(keep), torch.as_tensor(val_idx)
    device = dataset.train_images.device
    train_images = dataset.train_images[keep_t.to(device)]
    mean, std = _channel_stats(train_images.cpu())
    return dataclasses.replace(
        dataset, train_images=train_images, train_labels=dataset.train_labels[keep_t.to(device)],
        val_images=dataset.train_images[val_t.to(device)],
        val_labels=dataset.train_labels[val_t.to(device)], mean=mean, std=std)


def _check_limit(value: Any, name: str) -> int | None:
    if value is None:
        return None
    return check_int(value, name, minimum=1)


def _channel_stats(images: torch.Tensor) -> tuple[RGB, RGB]:
    x = images.to(torch.float64) / 255.0
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return _rgb(mean), _rgb(std)


def _rgb(values: torch.Tensor) -> RGB:
    red, green, blue = (float(v) for v in values)  # the images are (N, 3, 32, 32)
    return red, green, blue


def load_digits_dataset(seed: int = 0, *, test_fraction: float = 0.25,
                        train_limit: int | None = None,
                        test_limit: int | None = None) -> ImageDataset:
    """scikit-learn's bundled 8x8 digits (1797 images, 10 classes) as 32x32 RGB images.

    The 0..16 grey levels are scaled to 0..255, resized bilinearly to 32x32
    (the paper's models are built for CIFAR's input) and replicated to three
    channels. ``seed`` fixes the stratified train/test split; the limits keep
    the first images of each split (for quick runs and tests). No augmentation:
    flipping a digit changes its meaning.
    """
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)):
        raise TypeError(f"test_fraction must be a float, got {type(test_fraction).__name__}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    train_limit = _check_limit(train_limit, "train_limit")
    test_limit = _check_limit(test_limit, "test_limit")
    bunch = load_digits()
    labels = np.asarray(bunch.target, dtype=np.int64)
    rng = np.random.default_rng(seed)
    train_parts, test_parts = [], []
    for cls in range(10):  # stratified: every class split in the same proportion
        members = rng.permutation(np.flatnonzero(labels == cls))
        cut = int(round(len(members) * test_fraction))
        test_parts.append(members[:cut])
        train_parts.append(members[cut:])
    train_idx = rng.permutation(np.concatenate(train_parts))[:train_limit]
    test_idx = rng.permutation(np.concatenate(test_parts))[:test_limit]
    small = torch.as_tensor(bunch.images, dtype=torch.float32)[:, None] * (255.0 / 16.0)
    big = F.interpolate(small, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear",
                        align_corners=False)
    images = big.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    targets = torch.as_tensor(labels)
    train_images = images[torch.as_tensor(train_idx)]
    mean, std = _channel_stats(train_images)
    return ImageDataset(
        name="digits", train_images=train_images, train_labels=targets[torch.as_tensor(train_idx)],
        test_images=images[torch.as_tensor(test_idx)],
        test_labels=targets[torch.as_tensor(test_idx)],
        num_classes=10, mean=mean, std=std, augment=False,
    )


# ---------------------------------------------------------------- CIFAR


def _read_batch(path: Path, label_key: bytes, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    batch = restricted_load(path)
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: expected a dict batch, got {type(batch).__name__}")
    for key in (b"data", label_key):
        if key not in batch:
            raise ValueError(f"{path}: batch has no {key!r} entry (keys: {_key_list(batch)})")
    data = batch[b"data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != _CIFAR_PIXELS:
        desc = (f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray)
                else type(data).__name__)
        raise ValueError(f"{path}: b'data' must be a uint8 array of shape (N, {_CIFAR_PIXELS}), "
                         f"got {desc}")
    labels = batch[label_key]
    if not isinstance(labels, (list, np.ndarray)) or (
            isinstance(labels, np.ndarray) and labels.ndim != 1) or not all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in labels):
        raise ValueError(f"{path}: {label_key!r} must be a list of ints")
    if len(labels) != data.shape[0]:
        raise ValueError(f"{path}: {len(labels)} labels for {data.shape[0]} images")
    # checked as Python ints, before the conversion: a label like 2**70 overflows int64
    if len(labels) and not all(0 <= v < num_classes for v in labels):
        raise ValueError(f"{path}: labels must lie in [0, {num_classes}), "
                         f"got [{min(labels)}, {max(labels)}]")
    return data.reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE), np.asarray(labels, dtype=np.int64)


def _key_list(batch: dict[Any, Any], shown: int = 8) -> str:
    """The first ``shown`` keys of ``batch`` in a stable order (they may mix bytes and ints)."""
    keys = sorted(repr(key) for key in batch)
    return ", ".join(keys[:shown]) + (f", ... ({len(keys)} keys)" if len(keys) > shown else "")


def _cifar_layout(variant: str) -> tuple[str, list[str], list[str], bytes, int]:
    if variant == "cifar10":
        return ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                b"labels", 10)
    if variant == "cifar100":
        return "cifar-100-python", ["train"], ["test"], b"fine_labels", 100
    raise ValueError(f"unknown CIFAR variant {variant!r}; expected 'cifar10' or 'cifar100'")


def load_cifar(root: str | Path, variant: str = "cifar10", *,
               train_limit: int | None = None, test_limit: int | None = None) -> ImageDataset:
    """CIFAR-10/100 from the standard python-pickle folders under ``root``.

    ``root`` is the folder that holds ``cifar-10-batches-py/`` (``data_batch_1``
    .. ``data_batch_5``, ``test_batch``) or ``cifar-100-python/`` (``train``,
    ``test``), i.e. where ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz``
    were extracted; the dataset folder itself is accepted too. Files are read
    with :class:`RestrictedUnpickler` and their keys, shapes, dtypes and labels
    are checked. CIFAR-100 uses the 100 fine labels.
    """
    if not isinstance(root, (str, Path)):
        raise TypeError(f"root must be a path, got {type(root).__name__}")
    folder_name, train_files, test_files, label_key, num_classes = _cifar_layout(variant)
    train_limit = _check_limit(train_limit, "train_limit")
    test_limit = _check_limit(test_limit, "test_limit")
    root = Path(root).expanduser()
    folder = root if root.name == folder_name else root / folder_name
    missing = [name for name in train_files + test_files if not (folder / name).is_file()]
    if missing:
        archive = "cifar-10-python.tar.gz" if variant == "cifar10" else "cifar-100-python.tar.gz"
        raise FileNotFoundError(
            f"{variant} not found: missing {', '.join(str(folder / m) for m in missing)}. "
            f"Download {archive} (python version) from {CIFAR_URL} and extract it into "
            f"{root} (so that {folder} holds {', '.join(train_files + test_files)}), "
            f"or pass --data-root pointing at the folder that contains {folder_name}/."
        )

    def read(names: list[str], limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [_read_batch(folder / name, label_key, num_classes) for name in names]
        images = np.concatenate([p[0] for p in parts])[:limit]
        labels = np.concatenate([p[1] for p in parts])[:limit]
        return torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels)

    train_images, train_labels = read(train_files, train_limit)
    test_images, test_labels = read(test_files, test_limit)
    if train_images.shape[0] == 0 or test_images.shape[0] == 0:
        raise ValueError(f"{folder}: the train and test splits must hold at least one image")
    mean, std = _channel_stats(train_images)
    return ImageDataset(name=variant, train_images=train_images, train_labels=train_labels,
                        test_images=test_images, test_labels=test_labels,
                        num_classes=num_classes, mean=mean, std=std, augment=True)


def load_dataset(name: str, *, root: str | Path | None = None, seed: int = 0,
                 train_limit: int | None = None, test_limit: int | None = None,
                 val_fraction: float = 0.0) -> ImageDataset:
    """``"digits"`` (bundled) or ``"cifar10"``/``"cifar100"`` read from ``root``.

    ``val_fraction`` of the training images (after ``train_limit``) is held out
    as the validation split, drawn with ``seed`` (:func:`hold_out_validation`).
    """
    if name == "digits":
        dataset = load_digits_dataset(seed, train_limit=train_limit, test_limit=test_limit)
    elif name in ("cifar10", "cifar100"):
        if root is None:
            raise ValueError(f"dataset {name!r} needs a data root (--data-root): the folder "
                             f"where the CIFAR archive from {CIFAR_URL} was extracted")
        dataset = load_cifar(root, name, train_limit=train_limit, test_limit=test_limit)
    else:
        raise ValueError(f"unknown dataset {name!r}; expected one of {DATASETS}")
    return hold_out_validation(dataset, val_fraction, seed)


# ---------------------------------------------------------------- batches


def augment_batch(images: torch.Tensor, generator: torch.Generator, *, padding: int = 4
                  ) -> torch.Tensor:
    """CIFAR augmentation: a random crop of the zero-padded image and a random horizontal flip.

    ``images`` is ``(B, C, H, W)`` (any dtype, any device); the offsets and flips
    are drawn on the CPU from ``generator`` (so they do not depend on the device).

    >>> x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4)
    >>> augment_batch(x, torch.Generator().manual_seed(0), padding=0).shape
    torch.Size([2, 1, 4, 4])
    """
    batch, _, height, width = images.shape
    offsets = torch.randint(0, 2 * padding + 1, (2, batch), generator=generator)
    flips = torch.rand(batch, generator=generator) < 0.5
    padded = F.pad(images, (padding, padding, padding, padding))
    rows = (offsets[0][:, None] + torch.arange(height)[None]).to(images.device)
    cols = offsets[1][:, None] + torch.arange(width)[None]
    cols = torch.where(flips[:, None], cols.flip(1), cols).to(images.device)
    index = torch.arange(batch, device=images.device)[:, None, None]
    cropped = padded.permute(0, 2, 3, 1)[index, rows[:, :, None], cols[:, None, :]]
    return cropped.permute(0, 3, 1, 2).contiguous()


def normalize(images: torch.Tensor, dataset: ImageDataset) -> torch.Tensor:
    """``uint8`` images to float32, scaled to [0, 1] and standardised per channel."""
    x = images.to(torch.float32) / 255.0
    mean = torch.tensor(dataset.mean, dtype=torch.float32, device=x.device)[None, :, None, None]
    std = torch.tensor(dataset.std, dtype=torch.float32, device=x.device)[None, :, None, None]
    return (x - mean) / std


def iter_batches(dataset: ImageDataset, split: str, batch_size: int, *,
                 generator: torch.Generator | None = None, augment: bool | None = None,
                 skip: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Normalised ``(images, labels)`` batches of a split.

    With a ``generator`` the order is a fresh permutation drawn from it (and,
    if ``augment`` — default: the dataset's own setting, train split only — the
    augmentation draws from it too); without one the order is fixed. ``skip``
    leaves out the first batches (after drawing their random numbers), which is
    how a run resumes in the middle of an epoch.
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    batch_size = check_int(batch_size, "batch_size", minimum=1)
    images = getattr(dataset, f"{split}_images")
    labels = getattr(dataset, f"{split}_labels")
    count = images.shape[0]
    if augment is None:
        augment = dataset.augment and split == "train"
    if augment and generator is None:
        raise ValueError("augment=True needs a generator (the augmentation is random)")
    augment_generator = generator if augment else None
    order = (torch.randperm(count, generator=generator) if generator is not None
             else torch.arange(count))
    for number, start in enumerate(range(0, count, batch_size)):
        index = order[start:start + batch_size].to(images.device)
        batch = images[index]
        if augment_generator is not None:
            batch = augment_batch(batch, augment_generator)
        if number < skip:
            continue
        yield normalize(batch, dataset), labels[index]
