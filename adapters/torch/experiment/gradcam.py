"""Grad-CAM (Selvaraju et al. 2017) with hooks: where a classifier looks for a class.

For a conv layer with activations ``A`` (``K`` maps of ``H x W``) and the score
``y_c`` of class ``c``: ``alpha_k = mean_{h,w} dy_c/dA_k``, the map is
``ReLU(sum_k alpha_k A_k)``, upsampled bilinearly to the input and scaled to
[0, 1] per image (an all-zero map stays 0). The paper's Fig. 4 compares these
maps of a Firefly-grown VGG16 with and without the similarity phase.

The layer defaults to the model's last ``Conv2d`` that is not its classifier
(a 1x1 conv producing the logits) — for the paper's VGG16 the last 3x3 conv.

>>> import torch
>>> from simcore.adapters.torch import vgg16
>>> maps = grad_cam(vgg16(width=4).eval(), torch.randn(2, 3, 32, 32))
>>> maps.shape, bool((maps >= 0).all() and (maps <= 1).all())
(torch.Size([2, 32, 32]), True)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["default_cam_layer", "grad_cam"]


def default_cam_layer(model: nn.Module) -> str:
    """The name of the last ``Conv2d`` of ``model`` that does not output the logits."""
    convs = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    classifier = getattr(model, "classifier", None)
    convs = [name for name in convs if model.get_submodule(name) is not classifier]
    if not convs:
        raise ValueError("model has no Conv2d layer (other than its classifier) for Grad-CAM")
    return convs[-1]


def grad_cam(model: nn.Module, images: torch.Tensor, targets: torch.Tensor | None = None, *,
             layer: str | None = None) -> torch.Tensor:
    """Grad-CAM maps ``(B, H, W)`` in [0, 1] for ``images`` ``(B, C, H, W)``.

    ``targets`` are the classes to explain (default: the predicted ones);
    ``layer`` names the conv module whose output is explained (default:
    :func:`default_cam_layer`). The model is used as given (call ``.eval()``
    first for BatchNorm's running statistics); its parameters' ``.grad`` are
    left untouched.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise ValueError("images must be a (B, C, H, W) tensor")
    name = default_cam_layer(model) if layer is None else layer
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"layer {name!r} is not a module of the model") from None
    captured: dict[str, torch.Tensor] = {}

    def keep(_module, _inputs, output):
        captured["activation"] = output

    handle = module.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            x = images.detach().requires_grad_(True)  # makes the graph reach the hooked layer
            logits = model(x)
            if targets is None:
                targets = logits.argmax(dim=1)
            targets = torch.as_tensor(targets, device=logits.device).reshape(-1)
            if targets.shape[0] != images.shape[0]:
                raise ValueError(f"targets has {targets.shape[0]} entries for "
                                 f"{images.shape[0]} images")
            if "activation" not in captured:
                raise ValueError(f"layer {name!r} was not called in the forward pass")
            activation = captured["activation"]
            score = logits.gather(1, targets[:, None].long()).sum()
            # autograd.grad, not backward: parameters' .grad stay as they were
            (gradient,) = torch.autograd.grad(score, activation)
    finally:
        handle.remove()
    weights = gradient.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * activation).sum(dim=1, keepdim=True)).detach()
    cam = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    peak = cam.amax(dim=(1, 2), keepdim=True)
    return torch.where(peak > 0, cam / peak.clamp_min(torch.finfo(cam.dtype).tiny), cam)
