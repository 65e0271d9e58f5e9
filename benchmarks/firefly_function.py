"""How much one Firefly growth changes what a trained network computes, at real widths.

Trains the project's VGG16 (``simcore.adapters.torch.vgg16``) at the given width on the
bundled digits (32x32 RGB, no download) for a few epochs, then grows it once with
``FireflyGrower`` (ratio 0.35, the preset's scoring) and compares the network before and
after on the held-out test images: cross-entropy, the largest logit change relative to the
logits' RMS, and argmax agreement. Each configuration starts from the same trained weights.
At the default width (half of torchvision's VGG16: 32 ... 256 channels) the widest layers
have fan-in 2304.

Run: ``python benchmarks/firefly_function.py [--width-scale 0.5] [--epochs 3]``.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import time

import torch
from simcore.adapters.torch import FireflyGrower, vgg16
from torch import nn
from torch.nn import functional as F

from simcore.experiment.data import iter_batches, load_digits_dataset

FULL_WIDTHS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)


def _batches(data, split, batch_size, seed=0):
    generator = torch.Generator().manual_seed(seed) if split == "train" else None
    yield from iter_batches(data, split, batch_size, generator=generator, augment=False)


def _train(model, data, epochs, lr):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    model.train()
    for epoch in range(epochs):
        for images, labels in _batches(data, "train", 64, seed=epoch):
            optimizer.zero_grad()
            F.cross_entropy(model(images), labels).backward()
            optimizer.step()
    return optimizer


@torch.no_grad()
def _logits(model, data):
    model.eval()
    outs, labels = [], []
    for images, y in _batches(data, "test", 256):
        outs.append(model(images))
        labels.append(y)
    return torch.cat(outs), torch.cat(labels)


def _compare(before, after, labels):
    scale = before.pow(2).mean().sqrt()
    return {
        "ce_before": float(F.cross_entropy(before, labels)),
        "ce_after": float(F.cross_entropy(after, labels)),
        "max_dlogit_rel": float((after - before).abs().max() / scale),
        "argmax_agree": float((after.argmax(1) == before.argmax(1)).float().mean()),
        "acc_before": float((before.argmax(1) == labels).float().mean()),
        "acc_after": float((after.argmax(1) == labels).float().mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width-scale", type=float, default=0.5)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--growth-batches", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    data = load_digits_dataset(args.seed)
    widths = [max(1, round(w * args.width_scale)) for w in FULL_WIDTHS]
    model = vgg16(width=widths)
    start = time.perf_counter()
    _train(model, data, args.epochs, args.lr)
    print(f"VGG16 widths {widths} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
          f"parameters), {args.epochs} epochs on digits in {time.perf_counter() - start:.0f} s")
    before, labels = _logits(model, data)
    scoring = list(_batches(data, "train", 64, seed=99))[: args.growth_batches]

    configs = {"firefly (splits and new neurons)": {}, "splits only": {"new_per_layer": 0}}
    # The reference's absolute draws written as trained, where this version of the grower has them.
    if "scales" in inspect.signature(FireflyGrower).parameters:
        reference = {"scales": "absolute", "split_eps": None, "new_eps": None}
        configs["reference scales, written as trained"] = reference
    for label, kwargs in configs.items():
        grown = copy.deepcopy(model)
        start = time.perf_counter()
        report = FireflyGrower(seed=args.seed, **kwargs).grow(
            grown, scoring, nn.functional.cross_entropy, ratio=0.35)
        seconds = time.perf_counter() - start
        after, _ = _logits(grown, data)
        m = _compare(before, after, labels)
        print(f"{label}: +{report.total_added} neurons in {seconds:.1f} s; held-out CE "
              f"{m['ce_before']:.3f} -> {m['ce_after']:.3f}, accuracy {m['acc_before']:.3f} -> "
              f"{m['acc_after']:.3f}, max |dlogit| / logit RMS {m['max_dlogit_rel']:.3g}, "
              f"argmax agreement {m['argmax_agree']:.3f}")


if __name__ == "__main__":
    main()
