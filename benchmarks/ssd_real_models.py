"""One SSD growth (fast mode) of the zoo's ResNet18 and MobileNetV2 against one training step.

Width 1.0, 32x32 random images, batch 64, SGD with momentum, ratio 0.35, two torch threads
(the README's "Growth cost" numbers; about a minute on 2 CPU cores):

    python benchmarks/ssd_real_models.py
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from simcore.adapters.torch.growers import SSDGrower
from simcore.adapters.torch.zoo import build


def _parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    torch.set_num_threads(2)
    for name in ("resnet18", "mobilenet_v2"):
        model = build(name, width=1.0, seed=0)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(64, 3, 32, 32, generator=generator)
        y = torch.randint(0, 10, (64,), generator=generator)
        model.train()
        start = time.perf_counter()
        for _ in range(2):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
        step = (time.perf_counter() - start) / 2
        before = _parameters(model)
        start = time.perf_counter()
        SSDGrower("fast").grow(model, [(x, y)], F.cross_entropy, optimizer, ratio=0.35)
        growth = time.perf_counter() - start
        print(f"{name}: {before:,} -> {_parameters(model):,} parameters; SSD fast growth "
              f"{growth:.1f} s, one training step {step:.2f} s ({growth / step:.0f} steps)",
              flush=True)


if __name__ == "__main__":
    main()
