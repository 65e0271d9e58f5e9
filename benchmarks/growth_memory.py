"""Peak memory of one growth of a large model, as a multiple of the model's size.

Builds the zoo's VGG11 with BatchNorm at ``--width`` (2.0: about 37M parameters, 147 MB in
float32), takes one SGD-with-momentum step (so the optimizer holds a momentum buffer per
parameter) and grows it once (ratio 0.35, optimizer state carried). Each method runs in its
own process; the peak resident memory during the growth above the memory just before it is
printed in MB and as a multiple of the parameters' bytes. CPU only (peak RSS).

Run: ``python benchmarks/growth_memory.py [--width 2.0] [--methods random firefly]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _measure(method: str, width: float) -> dict[str, float]:
    import torch
    from simcore.adapters.torch import FireflyGrower, RandomGrower
    from simcore.adapters.torch.zoo import build
    from torch import nn

    torch.manual_seed(0)
    model = build("vgg11_bn", width=width, seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    params = sum(p.numel() for p in model.parameters())
    grower = RandomGrower(seed=0) if method == "random" else FireflyGrower(seed=0)
    before = _rss_mb()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    report = grower.grow(model, [(x, y)], nn.functional.cross_entropy, optimizer, ratio=0.35)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    model_mb = params * 4 / 2**20
    return {"params_before": params, "params_after": report.params_after, "model_mb": model_mb,
            "rss_before_mb": before, "peak_extra_mb": peak - before,
            "peak_was_earlier": float(peak <= peak_before)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=float, default=2.0)
    parser.add_argument("--methods", nargs="+", default=["random", "firefly"])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_measure(args.child, args.width)))
        return
    for method in args.methods:
        out = subprocess.run([sys.executable, __file__, "--width", str(args.width),
                              "--child", method], capture_output=True, text=True, check=True)
        m = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{method}: {m['params_before'] / 1e6:.1f}M -> {m['params_after'] / 1e6:.1f}M "
              f"parameters ({m['model_mb']:.0f} MB); peak memory during the growth "
              f"{m['peak_extra_mb']:.0f} MB above the {m['rss_before_mb']:.0f} MB before it = "
              f"{m['peak_extra_mb'] / m['model_mb']:.1f}x the model"
              + (" (the peak was before the growth: a lower bound)" if m["peak_was_earlier"]
                 else ""))


if __name__ == "__main__":
    main()
