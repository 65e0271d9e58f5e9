"""Checkpoints of grown models: widths, weights, optimizer, schedule position and RNG state.

A grown model no longer matches its seed's constructor, so a checkpoint stores
how to rebuild it (the builder's name and its keyword arguments, the current
per-layer widths included, from :func:`simcore.adapters.torch.architecture`)
next to the ``state_dict``. Everything is stored as tensors and primitive
containers, so :func:`load_checkpoint` reads it with
``torch.load(..., weights_only=True)`` (no pickled code runs on load).

What is stored: the architecture, the model's ``state_dict`` (BatchNorm
running statistics included), the optimizer's and scheduler's ``state_dict``
(with the names of the optimizer's parameters in its order, which is how a
resume checks it rebuilt the optimizer over the same parameters),
the Python, NumPy (legacy global generator) and torch RNG states (CUDA too
where CUDA is initialised), and ``extra`` (e.g. the epoch, the growth schedule's
position). Restoring all of it makes a resumed run continue bitwise-identically
on the same machine and software (tested).

>>> import os, tempfile, torch
>>> from simcore.adapters.torch import vgg16, widths, save_checkpoint, load_checkpoint
>>> model = vgg16(width=[8] * 12 + [12])
>>> path = os.path.join(tempfile.mkdtemp(), "run.pt")
>>> save_checkpoint(path, model, extra={"epoch": 50})
>>> restored = load_checkpoint(path)
>>> widths(restored.model)[-1], restored.extra
(12, {'epoch': 50})
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import models

__all__ = ["FORMAT", "Checkpoint", "load_checkpoint", "rng_state", "save_checkpoint",
           "set_rng_state"]

#: Stored under "format"; bumped if the layout changes.
FORMAT = "simcore.torch.checkpoint/2"

_PRIMITIVES = (bool, int, float, str, type(None))


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` returns; ``optimizer``/``scheduler`` ``None`` unless asked."""

    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    scheduler: Any
    extra: Any
    architecture: dict[str, Any]


def _check_storable(value: Any, where: str) -> None:
    """Only what ``torch.load(weights_only=True)`` reads back: tensors and primitive containers."""
    if isinstance(value, (torch.Tensor, *_PRIMITIVES)):
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"{where} has a key of type {type(key).__name__}; use str or int")
            _check_storable(item, f"{where}[{key!r}]")
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_storable(item, f"{where}[{i}]")
        return
    raise TypeError(
        f"{where} holds a {type(value).__name__}; a checkpoint stores only tensors, numbers, "
        f"strings, None and lists/tuples/dicts of them"
    )


def rng_state() -> dict[str, Any]:
    """The Python, NumPy and torch RNG states as tensors and primitive lists."""
    version, words, gauss = random.getstate()
    # The legacy global generator on purpose: it is the one scripts seed with np.random.seed.
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # noqa: NPY002
    state = {
        "python": {"version": version, "state": list(words), "gauss": gauss},
        "numpy": {"name": name, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npy = state["numpy"]
    keys = npy["keys"].numpy().astype(np.uint32)
    legacy = (npy["name"], keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"])
    np.random.set_state(legacy)  # noqa: NPY002
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _optimizer_param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    """The model's name of each optimizer parameter, per param group, in the optimizer's order.

    ``Optimizer.load_state_dict`` matches parameters by position only, so these
    names are what tells a resumed optimizer built in another order (even one
    that swaps two same-shaped parameters) from the saved one.
    """
    names = {id(p): name for name, p in model.named_parameters()}
    groups = []
    for g, group in enumerate(optimizer.param_groups):
        unknown = [i for i, p in enumerate(group["params"]) if id(p) not in names]
        if unknown:
            raise ValueError(
                f"optimizer parameter {unknown[0]} of param group {g} is not a parameter of "
                f"the model; a checkpoint's optimizer must hold only the model's parameters"
            )
        groups.append([names[id(p)] for p in group["params"]])
    return groups


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    *,
    extra: Any = None,
    architecture: Mapping[str, Any] | None = None,
) -> None:
    """Write ``model`` (its widths and weights), optimizer, scheduler, RNG states and ``extra``.

    ``architecture`` defaults to :func:`simcore.adapters.torch.architecture`
    (the paper's models); for another model pass ``{"builder": name, "kwargs":
    {...}}`` and give :func:`load_checkpoint` a matching ``builders``. The file
    is written to a temporary name and renamed, so a crash never leaves half a
    checkpoint under ``path``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}"
        )
    if scheduler is not None and not callable(getattr(scheduler, "state_dict", None)):
        raise TypeError(f"scheduler must have a state_dict(), got {type(scheduler).__name__}")
    if architecture is None:
        architecture = models.architecture(model)
    else:
        if not isinstance(architecture, Mapping) or not isinstance(
            architecture.get("builder"), str
        ):
            raise TypeError(
                "architecture must be a mapping {'builder': name, 'kwargs': {...}}"
            )
        architecture = {"builder": architecture["builder"],
                        "kwargs": dict(architecture.get("kwargs", {}))}
    _check_storable(architecture, "architecture")
    _check_storable(extra, "extra")
    payload = {
        "format": FORMAT,
        "architecture": architecture,
        "model": model.state_dict(),
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "optimizer_params": (None if optimizer is None
                             else _optimizer_param_names(model, optimizer)),
        "scheduler": None if scheduler is None else scheduler.state_dict(),
        "rng": rng_state(),
        "extra": extra,
    }
    # Checked here so that a checkpoint never saves fine and then fails under weights_only.
    _check_storable(payload["optimizer"], "optimizer.state_dict()")
    _check_storable(payload["scheduler"], "scheduler.state_dict()")
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def _check_optimizer_order(saved: list[list[str]], rebuilt: list[list[str]]) -> None:
    """Refuse an optimizer whose parameters are not the saved one's, group by group, in order.

    Same names mean same shapes too: the model was just loaded from the saved
    ``state_dict``. Optimizer state shapes are not compared (Adafactor's
    factored ``row_var``/``col_var`` legitimately differ from the parameter's).
    """
    advice = ("build the optimizer over the parameters in the order the saved one had "
              "(e.g. model.parameters())")
    if [len(g) for g in saved] != [len(g) for g in rebuilt]:
        raise ValueError(
            f"the optimizer has param groups of sizes {[len(g) for g in rebuilt]} but the saved "
            f"one had {[len(g) for g in saved]}: {advice}"
        )
    for g, (old, new) in enumerate(zip(saved, rebuilt, strict=True)):
        for i, (a, b) in enumerate(zip(old, new, strict=True)):
            if a != b:
                raise ValueError(
                    f"optimizer param group {g} holds {b!r} at position {i} where the saved "
                    f"optimizer had {a!r}: {advice}"
                )


def load_checkpoint(
    path: str | os.PathLike,
    *,
    optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] | None = None,
    scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
    device: str | torch.device | None = None,
    restore_rng: bool = True,
    builders: Mapping[str, Callable[..., nn.Module]] | None = None,
) -> Checkpoint:
    """Rebuild the saved model at its saved widths and load everything into it.

    ``optimizer`` and ``scheduler`` are factories, because a grown model's
    parameters only exist after the rebuild: ``optimizer(model.parameters())``
    must build the same kind of optimizer over the parameters in the saved
    order (checked by name: another order raises ``ValueError``),
    ``scheduler(optimizer)`` the same kind of scheduler; their states are
    then loaded (optimizer first, so the learning rates come back too). The
    model is moved to ``device`` before the optimizer is built. With
    ``restore_rng`` (default) the RNG states are restored last, so the next
    random draw is the one the saved run would have made.
    """
    if optimizer is not None and not callable(optimizer):
        raise TypeError("optimizer must be a factory: optimizer(model.parameters()) -> Optimizer")
    if scheduler is not None and not callable(scheduler):
        raise TypeError("scheduler must be a factory: scheduler(optimizer) -> LR scheduler")
    if scheduler is not None and optimizer is None:
        raise ValueError("a scheduler factory needs an optimizer factory")
    payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(payload, Mapping) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a simcore torch checkpoint ({FORMAT})")
    description = payload["architecture"]
    known = dict(builders or {})
    if description["builder"] in known:
        model = known[description["builder"]](**description["kwargs"])
    else:
        model = models.build(description)
    model.load_state_dict(payload["model"])
    if device is not None:
        model.to(device)

    opt = sched = None
    if optimizer is not None:
        if payload["optimizer"] is None:
            raise ValueError(f"{path} holds no optimizer state")
        opt = optimizer(model.parameters())
        _check_optimizer_order(payload["optimizer_params"], _optimizer_param_names(model, opt))
        if scheduler is not None:
            if payload["scheduler"] is None:
                raise ValueError(f"{path} holds no scheduler state")
            # Built before the states are loaded: a scheduler's constructor resets the lr.
            sched = scheduler(opt)
        opt.load_state_dict(payload["optimizer"])
        if sched is not None:
            sched.load_state_dict(payload["scheduler"])
    if restore_rng:
        set_rng_state(payload["rng"])
    return Checkpoint(model, opt, sched, payload["extra"], description)
