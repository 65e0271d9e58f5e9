"""What a ``simcore grow`` run measures: accuracy, similarity statistics, a growth's phase effect.

:func:`evaluate` gives the accuracy of a split; :func:`layer_stats` the Fig. 6
similarity statistics of one conv/linear layer; :func:`measure_phase` what a
post-growth phase did to each grown layer; :func:`growth_line` prints a growth
record in one line. :mod:`simcore.experiment.runner` calls them during a run.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from simcore.adapters.torch import is_depthwise_layer, layer_weight

from .data import ImageDataset, iter_batches
from .run_common import phase_layer_record, similarity_summary, weight_record

__all__ = ["accuracies", "evaluate", "final_similarity", "growth_line", "layer_name",
           "layer_stats", "measure_phase", "similarity_layers", "weight_stats"]


def similarity_layers(model: nn.Module) -> list[str]:
    """The module names of the conv/linear layers the similarity statistics cover (no depthwise)."""
    return [n for n, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear)) and not is_depthwise_layer(m)]


def layer_name(model: nn.Module, layer: int) -> str:
    """The module name of conv/linear layer ``layer`` (1-based, depthwise convs not counted).

    The paper's Fig. 6 looks at layer 2: VGG16's second conv, MobileNetV1's
    first pointwise conv.
    """
    names = similarity_layers(model)
    if not 1 <= layer <= len(names):
        raise ValueError(f"layer must lie in [1, {len(names)}], got {layer}")
    return names[layer - 1]


def layer_stats(model: nn.Module, name: str) -> dict[str, Any]:
    return weight_stats(layer_weight(model, name), name)


def _rows(weight: torch.Tensor) -> np.ndarray:
    """A weight as NumPy float64 rows, one per neuron (PyTorch keeps neurons on axis 0)."""
    return weight.detach().to("cpu", torch.float64).reshape(weight.shape[0], -1).numpy()


def weight_stats(weight: torch.Tensor, name: str) -> dict[str, Any]:
    return weight_record(_rows(weight), name)


def final_similarity(model: nn.Module) -> dict[str, Any]:
    """Mean |cos| and share in [-0.5, 0.5] of every conv/linear layer, and their means."""
    return similarity_summary({name: _rows(layer_weight(model, name))
                               for name in similarity_layers(model)})


@torch.no_grad()
def evaluate(model: nn.Module, dataset: ImageDataset, batch_size: int = 500,
             split: str = "test") -> float | None:
    """Accuracy in percent on ``split`` (eval mode; the model's mode restored).

    ``None`` for an empty split (a dataset without validation images).
    """
    count = getattr(dataset, f"{split}_labels").shape[0]
    if count == 0:
        return None
    was_training = model.training
    model.eval()
    correct = 0
    try:
        for x, y in iter_batches(dataset, split, batch_size):
            correct += int((model(x).argmax(dim=1) == y).sum())
    finally:
        model.train(was_training)
    return 100.0 * correct / count


def accuracies(model: nn.Module, dataset: ImageDataset) -> dict[str, float | None]:
    return {"test": evaluate(model, dataset), "val": evaluate(model, dataset, split="val")}


def measure_phase(record, model, dataset, before, layers) -> None:
    """Fill ``record`` (a growth's) with what its phase did to each grown layer, and accuracy."""
    measured = set(similarity_layers(model))
    layers = [name for name in layers if name in measured]
    for name, old in zip(layers, before, strict=True):
        record["phase"]["layers"][name] = phase_layer_record(
            _rows(old), _rows(layer_weight(model, name)), name)
    record["accuracy"]["after_phase"] = accuracies(model, dataset)


def growth_line(record: dict[str, Any]) -> str:
    """One compact line for a growth record: size, phase effect (grown layers' means), accuracy."""
    acc = record["accuracy"]

    def pair(key):
        values = acc.get(key)
        if values is None:
            return "-"
        test = f"{values['test']:.1f}"
        return test if values.get("val") is None else f"{test}/{values['val']:.1f}"

    text = (f"growth at epoch {record['epoch']}: {record['params_before']} -> "
            f"{record['params_after']} parameters")
    if record.get("growth_seconds") is not None:
        cost = f"{record['growth_seconds']:.2f} s"
        if record.get("growth_epochs") is not None:
            cost += f" = {record['growth_epochs']:.2f} epochs"
        text += f" in {cost}"
    layers = (record.get("phase") or {}).get("layers") or {}
    if layers:
        values = list(layers.values())
        before = np.mean([v["before"]["mean_abs"] for v in values])
        after = np.mean([v["after"]["mean_abs"] for v in values])
        share0 = 100 * np.mean([v["before"]["share_within_half"] for v in values])
        share1 = 100 * np.mean([v["after"]["share_within_half"] for v in values])
        change = 100 * np.mean([v["relative_change"] for v in values])
        drift = 100 * np.mean([v["scale_drift"] for v in values])
        text += (f"; phase on {len(values)} layers: mean |cos| {before:.3f} -> {after:.3f}, "
                 f"in [-0.5, 0.5] {share0:.0f}% -> {share1:.0f}%, weights moved {change:.1f}%, "
                 f"scale {drift:+.2f}%")
    text += (f"; accuracy test/val before {pair('before_growth')}, after growth "
             f"{pair('after_growth')}, after phase {pair('after_phase')}")
    return text
