"""Checkpoints of grown models: widths, weights, optimizer, schedule position and RNG state.

A grown model no longer matches its seed's constructor, so a checkpoint stores
how to rebuild it next to the ``state_dict``: every layer's sizes, for any module
tree (:func:`~simcore.adapters.torch.layer_sizes.layer_sizes`), so
``load_checkpoint(path, model=fresh)`` widens a freshly constructed model of the
same architecture to them (no builder to write: a third-party model reloads from
its own constructor); and, for the paper's models, the builder's name and keyword
arguments with the current per-layer widths (:func:`simcore.adapters.torch.architecture`),
so they reload without ``model``. Everything is stored as tensors and primitive
containers, so :func:`load_checkpoint` reads it with
``torch.load(..., weights_only=True)`` (no pickled code runs on load).

What is stored: the architecture, the model's ``state_dict`` (BatchNorm
running statistics included), the optimizer's and scheduler's ``state_dict``
(with the names of the optimizer's parameters in its order, which is how a
resume checks it rebuilt the optimizer over the same parameters),
the Python, NumPy (legacy global generator) and torch RNG states (CUDA too
where CUDA is initialised; :mod:`.random_states`), and ``extra`` (e.g. the epoch,
the growth schedule's position). Restoring all of it makes a resumed run continue
bitwise-identically on the same machine and software (tested).

A file is not trusted (tests/test_torch_checkpoint.py, 'untrusted files'): a SHA-256
content hash over every stored tensor's bytes and every other field
(:func:`content_digest`) is checked first, so damage after writing is refused; every field
is checked for its type and layout before use (:class:`CheckpointError`, never a
``KeyError``); the declared architecture is built on the ``meta`` device (nothing
allocated) and its ``state_dict`` shapes compared with the stored weights before the real
model is built, so a small file declaring a huge width is refused without allocating it;
and the optimizer factory must build the same kind of optimizer as the saved one. The
hash guards against damage, not forgery: anyone can compute it, which is why the fields
are validated as well. Files of the previous formats (``/3``: no layer sizes, ``/2``: no
hash and no optimizer kind either) still load through their builders, with every other check.

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

import hashlib
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import models
from .layer_sizes import layer_sizes, resize_to
from .random_states import is_rng_state, rng_state, set_rng_state

__all__ = ["FORMAT", "Checkpoint", "CheckpointError", "content_digest", "load_checkpoint",
           "save_checkpoint"]

#: Stored under "format"; bumped if the layout changes.
FORMAT = "simcore.torch.checkpoint/4"
#: Format 3: no recorded layer sizes (a model only rebuilds through a builder); still read.
FORMAT_3 = "simcore.torch.checkpoint/3"
#: Format 2: no content hash, no optimizer kind either; still read.
PREVIOUS_FORMAT = "simcore.torch.checkpoint/2"
#: The ``architecture["builder"]`` of a model no builder makes: it reloads into a freshly
#: constructed model passed as ``load_checkpoint(..., model=...)``, widened to the saved sizes.
MODULE_TREE = "module_tree"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded: damaged, forged, or not for this request."""

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


def content_digest(payload: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of everything in ``payload`` but its ``"digest"`` entry.

    Tensors contribute their dtype, shape and raw bytes; numbers, strings, ``None``, lists,
    tuples and mappings (in their order) their type and value. The walk is iterative, so
    no nesting depth can raise ``RecursionError``.
    """
    digest = hashlib.sha256()
    stack: list[Any] = [{k: v for k, v in payload.items() if k != "digest"}]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            flat = item.detach().cpu().contiguous().reshape(-1)
            digest.update(f"t{item.dtype}{tuple(item.shape)}:".encode())
            digest.update(flat.view(torch.uint8).numpy().tobytes())
        elif isinstance(item, Mapping):
            digest.update(f"d{len(item)}:".encode())
            for key, value in reversed(list(item.items())):
                stack.extend((value, key))
        elif isinstance(item, (list, tuple)):
            digest.update(f"{'l' if isinstance(item, list) else 'u'}{len(item)}:".encode())
            stack.extend(reversed(item))
        elif isinstance(item, float):
            digest.update(f"f{item.hex()};".encode())
        elif isinstance(item, (bool, int, str, type(None))):
            text = str(item)
            digest.update(f"{type(item).__name__[0]}{len(text)}:{text}".encode())
        else:  # torch.dtype, torch.Size... whatever weights_only may return
            text = f"{type(item).__qualname__}:{item!r}"
            digest.update(f"o{len(text)}:{text}".encode())
    return digest.hexdigest()


def _optimizer_kind(optimizer: torch.optim.Optimizer) -> str:
    return f"{type(optimizer).__module__}.{type(optimizer).__qualname__}"


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

    Every layer's sizes are recorded, so any model reloads with
    ``load_checkpoint(path, model=<freshly built>)``. ``architecture`` defaults to
    :func:`simcore.adapters.torch.architecture` for the paper's models (they reload without
    ``model``) and to ``{"builder": "module_tree", ...}`` for any other; a builder of your own
    is ``{"builder": name, "kwargs": {...}}`` with a matching ``builders`` at load. The file
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
        if isinstance(model, (models.VGG16, models.MobileNetV1)):
            architecture = models.architecture(model)
        else:
            kind = f"{type(model).__module__}.{type(model).__qualname__}"
            architecture = {"builder": MODULE_TREE, "kwargs": {"type": kind}}
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
        "layers": layer_sizes(model),
        "model": model.state_dict(),
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "optimizer_params": (None if optimizer is None
                             else _optimizer_param_names(model, optimizer)),
        "optimizer_kind": None if optimizer is None else _optimizer_kind(optimizer),
        "scheduler": None if scheduler is None else scheduler.state_dict(),
        "rng": rng_state(),
        "extra": extra,
    }
    # Checked here so that a checkpoint never saves fine and then fails under weights_only.
    _check_storable(payload["optimizer"], "optimizer.state_dict()")
    _check_storable(payload["scheduler"], "scheduler.state_dict()")
    payload["digest"] = content_digest(payload)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)  # a full disk or an interrupt leaves no half file behind
        if isinstance(err, (OSError, RuntimeError)):  # torch reports a full disk as either
            raise OSError(f"could not write checkpoint {path} ({err}); the previous one, if "
                          f"any, is unchanged") from err
        raise


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
    model: nn.Module | None = None,
) -> Checkpoint:
    """Rebuild the saved model at its saved widths and load everything into it.

    The model comes from ``model``, a freshly constructed model of the saved architecture at
    any width (e.g. the growth seed, built as it was before growing: any ``nn.Module``), which
    is widened in place to the saved layer sizes (:mod:`.layer_sizes`, checked against the
    stored shapes before anything is allocated); or, without ``model``, from the builder the
    file names (the paper's VGG16/MobileNetV1, or one of ``builders``).

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
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model must be a freshly built nn.Module, got {type(model).__name__}")
    try:
        payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    except RecursionError:
        raise CheckpointError(f"{path}: nested too deeply to be a checkpoint") from None
    payload = _checked_payload(payload, path)
    description = payload["architecture"]
    if model is not None:
        _resize(model, payload, path)
    else:
        builder = dict(builders or {}).get(description["builder"])
        if description["builder"] == MODULE_TREE and builder is None:
            raise CheckpointError(
                f"{path} holds a {description['kwargs'].get('type', 'model')} that no builder "
                "makes: pass model=<that model freshly built, e.g. at its seed width>")
        _check_widths(description, builder, payload["model"], path)
        model = _build(description, builder, path)
    model.load_state_dict(payload["model"])
    if device is not None:
        model.to(device)

    opt = sched = None
    if optimizer is not None:
        if payload["optimizer"] is None:
            raise ValueError(f"{path} holds no optimizer state")
        opt = optimizer(model.parameters())
        saved_kind = payload.get("optimizer_kind")
        if saved_kind is not None and saved_kind != _optimizer_kind(opt):
            raise CheckpointError(
                f"{path} holds the state of a {saved_kind.rpartition('.')[2]} optimizer but the "
                f"factory built a {type(opt).__name__} ({_optimizer_kind(opt)}); build the "
                "kind that was saved"
            )
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


def _fail(path: Any, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: {what}; the file is damaged or was not written by "
                           "save_checkpoint")


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _checked_payload(payload: Any, path: Any) -> Mapping[str, Any]:
    """``payload`` once its hash (current format) and every field's type and layout pass."""
    if not isinstance(payload, Mapping) or payload.get("format") not in (
            FORMAT, FORMAT_3, PREVIOUS_FORMAT):
        raise ValueError(f"{path} is not a simcore torch checkpoint ({FORMAT})")
    if payload["format"] != PREVIOUS_FORMAT:
        stored = payload.get("digest")
        if not isinstance(stored, str):
            raise _fail(path, "it has no content hash")
        if content_digest(payload) != stored:
            raise _fail(path, "its content hash does not match its contents (changed or "
                              "damaged after it was written)")
    for key in ("architecture", "model", "optimizer", "optimizer_params", "scheduler", "rng",
                "extra"):
        if key not in payload:
            raise _fail(path, f"it has no {key!r} entry")
    description = payload["architecture"]
    if not (isinstance(description, Mapping) and isinstance(description.get("builder"), str)
            and isinstance(description.get("kwargs"), Mapping)
            and all(isinstance(k, str) for k in description["kwargs"])):
        raise _fail(path, "'architecture' is not {'builder': name, 'kwargs': {name: value}}")
    layers = payload.get("layers")
    if payload["format"] == FORMAT and not (isinstance(layers, Mapping) and all(
            isinstance(k, str) and isinstance(v, Mapping) and all(isinstance(a, str) for a in v)
            for k, v in layers.items())):
        raise _fail(path, "'layers' is not {module name: {size attribute: value}}")
    state = payload["model"]
    if not (isinstance(state, Mapping) and all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())):
        raise _fail(path, "'model' is not a state_dict of named tensors")
    optimizer, names = payload["optimizer"], payload["optimizer_params"]
    if optimizer is None:
        if names is not None:
            raise _fail(path, "'optimizer_params' is given without an optimizer state")
    else:
        groups = optimizer.get("param_groups") if isinstance(optimizer, Mapping) else None
        if not (isinstance(groups, list) and isinstance(optimizer.get("state"), Mapping)
                and all(isinstance(g, Mapping) and isinstance(g.get("params"), list)
                        for g in groups)):
            raise _fail(path, "'optimizer' is not an optimizer state_dict")
        if not (isinstance(names, list) and all(_is_str_list(g) for g in names)):
            raise _fail(path, "'optimizer_params' is not a list of parameter-name lists")
        if [len(g) for g in names] != [len(g["params"]) for g in groups]:
            raise _fail(path, "'optimizer_params' does not match the optimizer's param groups")
    kind = payload.get("optimizer_kind")
    if kind is not None and not isinstance(kind, str):
        raise _fail(path, "'optimizer_kind' is not a name")
    if payload["scheduler"] is not None and not isinstance(payload["scheduler"], Mapping):
        raise _fail(path, "'scheduler' is not a scheduler state_dict")
    if not is_rng_state(payload["rng"]):
        raise _fail(path, "'rng' is not the Python, NumPy and torch RNG states")
    return payload


def _make(description: Mapping[str, Any], builder: Callable[..., nn.Module] | None) -> nn.Module:
    if builder is not None:
        return builder(**description["kwargs"])
    return models.build(description)


def _check_widths(description, builder, state, path) -> None:
    """Compare the declared architecture's shapes with the stored weights, allocating nothing.

    The model is built on the ``meta`` device (shapes without storage). A custom builder that
    cannot run there (it reads data, say) is not checked here; ``load_state_dict`` still is.
    """
    try:
        with torch.device("meta"):
            shape_model = _make(description, builder)
    except (TypeError, ValueError) as error:
        raise _fail(path, f"its architecture {dict(description)!r} cannot be built ({error})") \
            from None
    except (RuntimeError, NotImplementedError):
        return
    shapes = {k: tuple(v.shape) for k, v in shape_model.state_dict().items()}
    stored = {k: tuple(v.shape) for k, v in state.items()}
    for name in [*shapes, *(k for k in stored if k not in shapes)]:
        if shapes.get(name) != stored.get(name):
            declared, held = (f"shape {shapes[name]}" if name in shapes else "no such entry",
                              f"shape {stored[name]}" if name in stored else "no such entry")
            raise _fail(path, f"the architecture {description['builder']!r} declares {name!r} "
                              f"with {declared} but the stored weights have {held}")


def _resize(model: nn.Module, payload: Mapping[str, Any], path: Any) -> None:
    """Widen the freshly built ``model`` to the saved layer sizes (checked before allocating)."""
    if "layers" not in payload:
        raise CheckpointError(f"{path} was written before layer sizes were recorded "
                              f"({payload['format']}): load it with its builder instead of model=")
    try:
        resize_to(model, payload["layers"], payload["model"])
    except ValueError as error:
        raise CheckpointError(f"{path}: cannot rebuild the model from the given one: {error}") \
            from None


def _build(description, builder, path) -> nn.Module:
    try:
        return _make(description, builder)
    except (TypeError, ValueError) as error:
        raise _fail(path, f"its architecture cannot be built ({error})") from None
