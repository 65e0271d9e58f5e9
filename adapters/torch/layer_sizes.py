"""Layer sizes of any module tree: record them, and widen a freshly built model to them.

A grown model no longer matches its constructor's output, and most constructors do not take
per-layer widths. :func:`layer_sizes` records, for every module whose tensors a growth resizes
(``Conv*d``, ``Linear``, ``BatchNorm*d``, ``GroupNorm``, ``LayerNorm``), its type and size
attributes (``in_channels``, ``out_channels``, ``groups``, ``in_features``, ``out_features``,
``num_features``, ``num_channels``, ``normalized_shape``) as primitives;
:func:`resize_to` takes a freshly constructed model of the same architecture (any width: the
seed), checks those records against the stored ``state_dict`` shapes, sets the attributes and
replaces each resized parameter and buffer by an empty tensor of the stored shape (same
device, dtype and ``requires_grad``), so ``load_state_dict`` then fills it. Every check runs
before the first allocation, and any module type not listed above whose tensors would change
shape is refused by name (its forward may depend on sizes we do not know about).

>>> import torch
>>> from torch import nn
>>> grown = nn.Sequential(nn.Linear(3, 9), nn.ReLU(), nn.Linear(9, 2))
>>> fresh = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
>>> resize_to(fresh, layer_sizes(grown), grown.state_dict())
>>> fresh.load_state_dict(grown.state_dict())
<All keys matched successfully>
>>> fresh[2]
Linear(in_features=9, out_features=2, bias=True)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["SIZE_ATTRIBUTES", "layer_sizes", "resize_to"]

#: The size attributes recorded per module type (the ones growth surgery may change).
SIZE_ATTRIBUTES: dict[type[nn.Module], tuple[str, ...]] = {
    nn.modules.conv._ConvNd: ("in_channels", "out_channels", "groups"),
    nn.Linear: ("in_features", "out_features"),
    nn.modules.batchnorm._NormBase: ("num_features",),
    nn.GroupNorm: ("num_channels",),
    nn.LayerNorm: ("normalized_shape",),
}


def _type_name(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def _attributes(module: nn.Module) -> tuple[str, ...] | None:
    for kind, names in SIZE_ATTRIBUTES.items():
        if isinstance(module, kind):
            return names
    return None


def _primitive(value: Any) -> Any:
    return list(value) if isinstance(value, (tuple, list, torch.Size)) else value


def layer_sizes(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``{module name: {"type": qualified name, attribute: int or list}}`` for resizable layers."""
    out = {}
    for name, module in model.named_modules():
        names = _attributes(module)
        if names is None:
            continue
        record: dict[str, Any] = {"type": _type_name(module)}
        record.update({a: _primitive(getattr(module, a)) for a in names})
        out[name] = record
    return out


def _expected_shapes(module: nn.Module, sizes: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """The shape each of ``module``'s own tensors must have at the recorded sizes."""
    if isinstance(module, nn.modules.conv._ConvNd):
        groups = sizes["groups"]
        if groups < 1 or sizes["in_channels"] % groups or sizes["out_channels"] % groups:
            raise ValueError(f"groups {groups} does not divide the channels")
        kernel = tuple(module.kernel_size)
        if module.transposed:
            weight = (sizes["in_channels"], sizes["out_channels"] // groups, *kernel)
        else:
            weight = (sizes["out_channels"], sizes["in_channels"] // groups, *kernel)
        return {"weight": weight, "bias": (sizes["out_channels"],)}
    if isinstance(module, nn.Linear):
        return {"weight": (sizes["out_features"], sizes["in_features"]),
                "bias": (sizes["out_features"],)}
    if isinstance(module, nn.LayerNorm):
        shape = tuple(sizes["normalized_shape"])
        return {"weight": shape, "bias": shape}
    channels = sizes.get("num_features", sizes.get("num_channels"))
    return {k: (channels,) for k in ("weight", "bias", "running_mean", "running_var")}


def _checked_record(name: str, module: nn.Module, record: Any) -> dict[str, Any]:
    names = _attributes(module)
    if not isinstance(record, Mapping) or record.get("type") != _type_name(module):
        saved = record.get("type") if isinstance(record, Mapping) else record
        raise ValueError(f"module {name!r} is a {_type_name(module)} but the checkpoint recorded "
                         f"{saved!r}: build the architecture that was saved")
    sizes = {}
    for attr in names or ():
        value = record.get(attr)
        if attr == "normalized_shape":
            ok = isinstance(value, list) and all(
                isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
        else:
            ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
        if not ok:
            raise ValueError(f"module {name!r}: recorded {attr} {value!r} is not a positive size")
        sizes[attr] = value
    return sizes


def resize_to(model: nn.Module, sizes: Mapping[str, Any],
              state: Mapping[str, torch.Tensor]) -> None:
    """Widen (or narrow) ``model``'s layers in place to ``sizes`` and ``state``'s shapes.

    ``sizes`` is :func:`layer_sizes` of the saved model, ``state`` its ``state_dict``. Raises
    ``ValueError`` (nothing changed) when a recorded module is missing or of another type, a
    record disagrees with the stored shapes, or a module of another type would change shape.
    """
    if not isinstance(sizes, Mapping):
        raise ValueError("the recorded layer sizes are not a mapping of module names")
    keys = set(model.state_dict())
    if keys != set(state):
        extra, lacking = sorted(keys - set(state)), sorted(set(state) - keys)
        raise ValueError(f"the model's state_dict has {extra[:3]} that the checkpoint lacks and "
                         f"lacks {lacking[:3]}: build the architecture that was saved")
    modules = dict(model.named_modules())
    missing = sorted(set(sizes) - set(modules))
    if missing:
        raise ValueError(f"the model has no module {missing[0]!r} that the checkpoint recorded")
    changes: list[tuple[nn.Module, dict[str, Any], dict[str, tuple[int, ...]]]] = []
    for name, module in modules.items():
        own = {k: v for k, v in [*module._parameters.items(), *module._buffers.items()]
               if v is not None and f"{name}.{k}".lstrip(".") in state}
        stored = {k: tuple(state[f"{name}.{k}".lstrip(".")].shape) for k in own}
        resized = {k: shape for k, shape in stored.items() if shape != tuple(own[k].shape)}
        if name not in sizes:
            if resized and _attributes(module) is not None:
                raise ValueError(f"the checkpoint records no sizes for module {name!r}")
            if resized:
                raise ValueError(
                    f"module {name!r} ({_type_name(module)}) has tensors of other shapes in the "
                    f"checkpoint ({sorted(resized)}), and only {_resizable_names()} can be "
                    "resized")
            continue
        record = _checked_record(name, module, sizes[name])
        expected = _expected_shapes(module, record)
        for key, shape in stored.items():
            want = expected.get(key, tuple(own[key].shape))
            if shape != want:
                raise ValueError(f"module {name!r}: the stored {key!r} has shape {shape} but the "
                                 f"recorded sizes {record} give {want}")
        changes.append((module, record, resized))
    # Everything is checked: now set sizes and allocate the stored shapes.
    for module, record, resized in changes:
        for attr, value in record.items():
            setattr(module, attr, tuple(value) if attr == "normalized_shape" else value)
        for key, shape in resized.items():
            old = module._parameters.get(key)
            if old is not None:
                module._parameters[key] = nn.Parameter(
                    torch.empty(shape, dtype=old.dtype, device=old.device),
                    requires_grad=old.requires_grad)
            else:
                buffer = module._buffers[key]
                assert buffer is not None  # own only holds tensors
                module._buffers[key] = torch.empty(shape, dtype=buffer.dtype, device=buffer.device)


def _resizable_names() -> str:
    return ", ".join(kind.__name__.lstrip("_") for kind in SIZE_ATTRIBUTES)
