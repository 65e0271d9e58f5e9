"""Grad-CAM (Selvaraju et al. 2017) with hooks: where a classifier looks for a class.

For a conv layer with activations ``A`` (``K`` maps of ``H x W``) and the score
``y_c`` of class ``c``: ``alpha_k = mean_{h,w} dy_c/dA_k``, the map is
``ReLU(sum_k alpha_k A_k)``, upsampled bilinearly to the input and scaled to
[0, 1] per image (an all-zero map stays 0). The paper's Fig. 4 compares these
maps of a Firefly-grown VGG16 with and without the similarity phase.

The layer defaults to the output of the model's last conv block: its last
``Conv2d`` that is not the classifier (a 1x1 conv producing the logits), or,
when a ``BatchNorm`` and/or an activation module follow that conv, the last of
them. The paper's models put BatchNorm and an activation after every conv, so
for them the maps explain the rectified features the rest of the network
reads, not the conv's raw, un-normalised output.

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


def _is_activation(module: nn.Module) -> bool:
    # every elementwise nonlinearity torch ships (ReLU, SiLU, Hardswish, GELU, ...) lives there
    return type(module).__module__ == nn.ReLU.__module__


def default_cam_layer(model: nn.Module) -> str:
    """The output of ``model``'s last conv block: its last ``Conv2d`` that does not output
    the logits, or the ``BatchNorm`` / activation module registered right after it.

    Modules are taken in registration order, which is the order of a ``Sequential`` block.

    >>> from simcore.adapters.torch import vgg16
    >>> model = vgg16(width=4)
    >>> name = default_cam_layer(model)
    >>> name, type(model.get_submodule(name)).__name__
    ('features.42', 'ReLU')
    """
    classifier = getattr(model, "classifier", None)
    leaves = [(name, m) for name, m in model.named_modules()
              if not any(True for _ in m.children()) and m is not classifier]
    convs = [i for i, (_, m) in enumerate(leaves) if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError("model has no Conv2d layer (other than its classifier) for Grad-CAM")
    chosen = convs[-1]
    following = leaves[chosen + 1:]
    if following and isinstance(following[0][1], nn.modules.batchnorm._BatchNorm):
        chosen += 1
        following = following[1:]
    if following and _is_activation(following[0][1]):
        chosen += 1
    return leaves[chosen][0]


def grad_cam(model: nn.Module, images: torch.Tensor, targets: torch.Tensor | None = None, *,
             layer: str | None = None) -> torch.Tensor:
    """Grad-CAM maps ``(B, H, W)`` in [0, 1] for ``images`` ``(B, C, H, W)``.

    ``targets`` are the classes to explain (default: the predicted ones);
    ``layer`` names the module whose output is explained (default:
    :func:`default_cam_layer`: after the last conv's BatchNorm and
    activation). The model is used as given (call ``.eval()`` first for
    BatchNorm's running statistics); its parameters' ``.grad`` are left
    untouched.
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
