"""Growers for PyTorch models: Random (Dota 2 / Net2Net-style add), SSD and Firefly.

Every grower shares :meth:`Grower.grow`: find the growable layers
(:func:`~simcore.adapters.torch.surgery.discover_flows`), work out the budget
(``ratio`` of the neuron count by default, DESIGN.md section 2), score every
candidate neuron of every layer with statistics gathered by forward hooks and
``torch.autograd.grad`` (BatchNorm in eval mode while scoring; the model's
modes restored and no ``.grad`` left on parameters afterwards), pick the
lowest scores globally (:func:`simcore.growth.select_lowest`), and write the
result into the model with the core's widening operators and
:func:`~simcore.adapters.torch.surgery.apply_growth`. A growth is atomic as a
whole: if any layer fails, every layer grown before it is restored.

Under ``torch.distributed`` (e.g. DistributedDataParallel), each growth draws
its random seed on rank 0 and broadcasts it, and scores (SSD: the splitting
statistics) are averaged over ranks before selection, so every rank makes the
same decision (every rank must pass the same number of batches: the averages are
collectives); wrap the grown module again with
:func:`~simcore.adapters.torch.distributed.regrow_ddp`.

>>> import torch
>>> from torch import nn
>>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
>>> batches = [(torch.randn(16, 4), torch.randint(0, 3, (16,)))]
>>> report = RandomGrower(seed=0).grow(net, batches, nn.functional.cross_entropy, ratio=0.5)
>>> report.total_added, report.params_after > report.params_before
(8, True)
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from simcore._arrays import check_choice, check_int
from simcore.growth import UNITS, add_neurons
from simcore.growth.budget import growth_budget, select_lowest
from simcore.growth.firefly import (
    FireflySelection,
    firefly_apply,
    firefly_candidates,
    firefly_select,
)
from simcore.growth.optim_state import MODES
from simcore.growth.ssd import (
    bn_coefficient,
    hvp_from_statistics,
    min_eigenpairs,
    rayleigh_min_direction,
    splitting_matrices,
    ssd_split,
)
from simcore.growth.widen import INCOMING, OUTGOING

from .surgery import (
    GrowthError,
    TorchFlow,
    _commit,
    _growth_swaps,
    _undo,
    discover_flows,
    unwrap,
)

__all__ = ["FireflyGrower", "Grower", "GrowthReport", "RandomGrower", "SSDGrower"]


def _real(value, name, *, low=None, high=None, low_open=False):
    """``value`` as a finite float in ``[low, high)`` (``(low, high)`` with ``low_open``)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.floating,
                                                                     np.integer)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and value >= high
    if not np.isfinite(value) or too_low or too_high:
        bounds = ("(" if low_open else "[") + f"{low if low is not None else '-inf'}, " + (
            f"{high})" if high is not None else "inf)")
        raise ValueError(f"{name} must be finite and in {bounds}, got {value}")
    return value


@dataclass(frozen=True)
class GrowthReport:
    """What one growth did: per-layer widths and additions, the budget and parameter counts.

    ``scores`` holds, per producer, the float64 scores the selection saw (lowest wins; averaged
    over ranks): Random uniform draws, SSD ``lambda_min`` per neuron, Firefly gate gradients of
    the split candidates (one per neuron) followed by those of the new-neuron candidates.
    ``params_before``/``params_after`` count every parameter of the model.
    """

    method: str
    budget: int
    widths_before: dict[str, int]
    widths_after: dict[str, int]
    params_before: int
    params_after: int
    scores: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def added(self) -> dict[str, int]:
        """Neurons added per producer layer (0 for layers that did not grow)."""
        return {k: self.widths_after[k] - self.widths_before[k] for k in self.widths_before}

    @property
    def total_added(self) -> int:
        return sum(self.added.values())

    @property
    def grown_layers(self) -> list[str]:
        """Names of the producers that grew (what the similarity phase acts on)."""
        return [k for k, v in self.added.items() if v > 0]


# --------------------------------------------------------------------------- helpers


def _distributed() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _collective_device(t: torch.Tensor) -> torch.device:
    """Where a collective on ``t`` must run: NCCL only takes CUDA tensors, gloo takes CPU ones."""
    if torch.distributed.get_backend() == "nccl":
        return t.device if t.is_cuda else torch.device("cuda", torch.cuda.current_device())
    return t.device


def _average_across_ranks(t: torch.Tensor) -> torch.Tensor:
    """Mean of ``t`` over all ranks (a no-op without an initialised process group).

    Every rank must call it the same number of times in the same order (same flows, same
    number of batches), as with any collective.
    """
    if not _distributed():
        return t
    out = t.detach().to(_collective_device(t), copy=True)
    torch.distributed.all_reduce(out)
    return (out / torch.distributed.get_world_size()).to(t.device)


def _shared_seed(rng: np.random.Generator) -> int:
    """A seed drawn from ``rng``, rank 0's value on every rank."""
    seed = int(rng.integers(0, 2**62))
    if _distributed():
        box = torch.tensor([seed], dtype=torch.int64)
        box = box.to(_collective_device(box))
        torch.distributed.broadcast(box, src=0)
        seed = int(box.item())
    return seed


@contextmanager
def scoring_mode(model: nn.Module):
    """Eval mode for scoring (BatchNorm uses running stats); each module's mode restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def _param_count(model):
    return sum(p.numel() for p in model.parameters())


def _check_loss(loss, name="loss_fn(outputs, targets)"):
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
        raise TypeError(f"{name} must return a 0-d tensor, got {type(loss).__name__}")
    if not bool(torch.isfinite(loss)):
        raise ValueError(f"{name} is not finite ({float(loss)}): cannot score growth")
    return loss


def _batches(data_batches, required):
    if data_batches is None:
        if required:
            raise TypeError("data_batches is required: an iterable of (inputs, targets) pairs")
        return []
    batches = list(data_batches)
    for i, batch in enumerate(batches):
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise TypeError(f"data_batches[{i}] must be an (inputs, targets) pair")
    if required and not batches:
        raise ValueError("data_batches is empty: scoring needs at least one batch")
    return batches


def _budget(widths, params, ratio, unit, neuron_params):
    """Neurons to add this growth: ``ratio`` of the neuron count, or of the parameter count."""
    if unit == "neurons":
        return growth_budget(sum(widths), ratio, unit="neurons")
    # "parameters": at the width-weighted mean cost of one more neuron over the growable layers.
    per_neuron = sum(w * c for w, c in zip(widths, neuron_params, strict=True)) / sum(widths)
    return growth_budget(sum(widths), ratio, unit="parameters", params_per_neuron=per_neuron,
                         total_params=params)


def _neuron_cost(model, flow):
    """Parameters one more channel of ``flow`` costs (incoming row, BN, depthwise, consumers)."""
    modules = dict(model.named_modules())
    producer = modules[flow.producer]
    cost = producer.weight[0].numel() + (1 if producer.bias is not None else 0)
    for name in [flow.norm] + [d.norm for d in flow.depthwise]:
        if name is not None and modules[name].weight is not None:
            cost += 2
    for d in flow.depthwise:
        conv = modules[d.conv]
        cost += conv.weight[0].numel() + (1 if conv.bias is not None else 0)
    for c in flow.consumers:
        consumer = modules[c.module]
        per_column = consumer.weight.shape[0] * (
            consumer.weight[0, 0].numel() if consumer.weight.ndim > 2 else 1
        )
        cost += per_column * c.spatial
    return cost


# --------------------------------------------------------------------------- base


class Grower:
    """Base of the growers: budget, global selection, atomic application, report.

    Subclasses implement :meth:`score` (per-layer scores, lowest wins, plus any
    state the widening needs) and :meth:`widen` (the core operator for one layer).
    ``seed`` seeds a ``numpy.random.Generator``; each growth draws a fresh seed
    from it (rank 0's under torch.distributed).
    """

    method = "base"
    needs_data = True

    def __init__(self, *, seed: int | None = 0, only_negative: bool = False):
        self.rng = np.random.default_rng(seed)
        if not isinstance(only_negative, (bool, np.bool_)):
            raise TypeError(f"only_negative must be a bool, got {type(only_negative).__name__}")
        self.only_negative = bool(only_negative)

    # subclass API ----------------------------------------------------------
    def score(self, model, flows, batches, loss_fn, rng) -> tuple[list[torch.Tensor], Any]:
        raise NotImplementedError

    def plan(self, params, core_flows, picks, state, rng) -> tuple[dict, list]:
        """The grown params of every flow (one dict) and a channel map per flow (None: no growth).

        ``picks`` is what :meth:`select` returned.

        Default: :meth:`widen` on each flow with picks, last flow first, chained on one dict.
        """
        maps = [None] * len(core_flows)
        out = dict(params)
        for index in reversed(range(len(core_flows))):
            chosen = np.asarray(picks[index], dtype=np.int64)
            if chosen.size:
                out, maps[index] = self.widen(out, core_flows[index], index, chosen, state, rng)
        return out, maps

    def widen(self, params, core_flow, index, picks, state, rng):
        raise NotImplementedError

    def select(self, scores, budget, caps, state):
        """Global lowest-``budget`` picks per layer (indices into each layer's scores)."""
        return select_lowest([s.numpy() for s in scores], budget, caps=caps,
                             only_negative=self.only_negative)

    # shared driver -----------------------------------------------------------
    def grow(
        self,
        model: nn.Module,
        data_batches: Iterable[tuple[Any, Any]] | None,
        loss_fn: Callable[[Any, Any], torch.Tensor] | None,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        ratio: float = 0.35,
        unit: str = "neurons",
        layers: Sequence[str] | None = None,
        flows: Sequence[TorchFlow] | None = None,
        example_input: Any = None,
        optimizer_mode: str = "carry",
        lr: float | None = None,
        caps: Sequence[int] | None = None,
    ) -> GrowthReport:
        """Grow ``model`` once; returns a :class:`GrowthReport`.

        ``data_batches``: an iterable of ``(inputs, targets)``; ``loss_fn(outputs,
        targets)`` a batch-mean loss. ``layers`` restricts growth to those
        producers (a layer that cannot grow raises ``GrowthError``); ``flows``
        gives hand-written flows instead of tracing (not both). ``example_input``
        is needed only without data when a flatten feeds a Linear. ``optimizer``
        follows the grown parameters: ``optimizer_mode="carry"`` keeps every
        state and gives new channels zero state, ``"reset"`` drops the state of
        every parameter of the optimizer (see
        :mod:`simcore.adapters.torch.optim`); ``lr`` (optional) then sets every
        param group's learning rate, as the reference does after a growth.
        """
        check_choice(unit, UNITS, "unit")
        check_choice(optimizer_mode, MODES, "optimizer_mode")
        if lr is not None:
            lr = _real(lr, "lr", low=0.0, low_open=True)
            if optimizer is None:
                raise ValueError("lr is given but there is no optimizer to set it on")
        if layers is not None and flows is not None:
            raise ValueError("give layers= or flows=, not both (flows already name the layers)")
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
            raise TypeError(f"ratio must be a float, got {type(ratio).__name__}")
        if not 0.0 < ratio < float("inf"):
            raise ValueError(f"ratio must be positive and finite, got {ratio}")
        if self.needs_data and not callable(loss_fn):
            raise TypeError(
                f"loss_fn must be callable as loss_fn(outputs, targets), got {loss_fn!r}"
            )
        net = unwrap(model)
        batches = _batches(data_batches, self.needs_data)
        if example_input is None and batches:
            example_input = batches[0][0][:1]
        if flows is None:
            flows = discover_flows(net, example_input, layers=layers)
        else:
            flows = list(flows)
            for f in flows:
                if not isinstance(f, TorchFlow):
                    raise TypeError(f"flows must hold TorchFlow objects, got {type(f).__name__}")
                f.check(net)
        if not flows:
            raise GrowthError(f"{type(net).__name__} has no growable layer")
        names = [f.producer for f in flows]
        widths = [f.channels(net) for f in flows]
        params_before = _param_count(net)
        budget = _budget(widths, params_before, float(ratio), unit,
                         [_neuron_cost(net, f) for f in flows])
        rng = np.random.default_rng(_shared_seed(self.rng))

        scores, state = self.score(net, flows, batches, loss_fn, rng)
        scores = [_average_across_ranks(s.detach().to(torch.float64).cpu()) for s in scores]
        picks = self.select(scores, budget, caps, state)
        params = {k: v.detach() for k, v in net.state_dict().items()}
        core_flows = [f.channel_flow(net) for f in flows]
        # Downstream layers grow first (plan and application): a layer's incoming rows, and any
        # direction over them, keep their size until every layer after it has grown.
        new_params, maps = self.plan(params, core_flows, picks, state, rng)
        applied = []
        try:
            for index in reversed(range(len(flows))):
                if maps[index] is None:
                    continue
                swaps = _growth_swaps(net, flows[index], new_params, maps[index], optimizer,
                                      optimizer_mode, lr)
                _commit(swaps)
                applied.append(swaps)
        except BaseException:
            for swaps in reversed(applied):
                _undo(swaps)
            raise
        return GrowthReport(
            method=self.method,
            budget=int(budget),
            widths_before=dict(zip(names, widths, strict=True)),
            widths_after={f.producer: f.channels(net) for f in flows},
            params_before=params_before,
            params_after=_param_count(net),
            scores={n: s.numpy() for n, s in zip(names, scores, strict=True)},
        )


# --------------------------------------------------------------------------- Random


class RandomGrower(Grower):
    """The paper's "Random" growth: add randomly initialised neurons (Dota 2 / Net2Net style).

    Which layers grow is random too: every existing neuron gets a uniform random
    score and the ``budget`` lowest win, so a layer grows in expectation in
    proportion to its width. New neurons get He-initialised incoming weights
    and, with ``outgoing="zero"`` (default), zero outgoing weights: the network
    function is kept exactly. ``outgoing="small"`` draws ``U(-scale, scale)``.
    """

    method = "random"
    needs_data = False

    def __init__(self, *, seed=0, incoming="he", outgoing="zero", outgoing_scale=0.01):
        super().__init__(seed=seed)
        self.incoming = check_choice(incoming, INCOMING, "incoming")
        self.outgoing = check_choice(outgoing, OUTGOING, "outgoing")
        self.outgoing_scale = _real(outgoing_scale, "outgoing_scale", low=0.0)

    def score(self, model, flows, batches, loss_fn, rng):
        return [torch.from_numpy(rng.random(f.channels(model))) for f in flows], None

    def widen(self, params, core_flow, index, picks, state, rng):
        return add_neurons(params, core_flow, int(picks.size), rng=rng, incoming=self.incoming,
                           outgoing=self.outgoing, outgoing_scale=self.outgoing_scale)


# --------------------------------------------------------------------------- SSD


def _patches(module, x):
    """The producer's input as ``(B, P, d)`` rows ordered like its weight rows."""
    if isinstance(module, nn.Linear):
        if x.ndim != 2:
            raise GrowthError("SSD needs a Linear producer's input to be (batch, features)")
        return x[:, None, :]
    if module.padding_mode != "zeros" or isinstance(module.padding, str):
        if isinstance(module.padding, str) and module.padding == "valid":
            padding = 0
        else:
            raise GrowthError(
                f"SSD unfolds patches with zero padding; {module} uses padding "
                f"{module.padding!r} / padding_mode {module.padding_mode!r}"
            )
    else:
        padding = module.padding
    cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=padding,
                    stride=module.stride)
    return cols.transpose(1, 2)


def _positions(t):
    """``(B, n, H, W)`` or ``(B, n)`` -> ``(B, P, n)``."""
    return t.flatten(2).transpose(1, 2) if t.ndim > 2 else t[:, None, :]


class _Capture:
    """Forward hooks recording, per flow, the producer input, pre-activation and activation."""

    def __init__(self, model, flows):
        modules = dict(model.named_modules())
        self.handles, self.records = [], [dict() for _ in flows]
        for record, flow in zip(self.records, flows, strict=True):
            producer = modules[flow.producer]
            pre = modules[flow.norm] if flow.norm is not None else producer
            self._hook(producer, record, "input", lambda m, i, o: i[0].detach())
            # A copy: an in-place activation overwrites the pre-activation tensor itself.
            self._hook(pre, record, "z", lambda m, i, o: o.detach().clone())
            self._hook(pre, record, "z_tensor", lambda m, i, o: o)
            if flow.activation is not None:
                # An activation module may be shared by several layers: keep only the call
                # that reads this flow's pre-activation.
                self._hook(modules[flow.activation], record, "h", lambda m, i, o: o,
                           when=lambda i, record=record: i[0] is record.get("z_tensor"))
            else:
                self._hook(pre, record, "h", lambda m, i, o: o)

    def _hook(self, module, record, key, get, when=None):
        def hook(m, inputs, output):
            if when is None or when(inputs):
                record[key] = get(m, inputs, output)

        self.handles.append(module.register_forward_hook(hook))

    def remove(self):
        for h in self.handles:
            h.remove()


class SSDGrower(Grower):
    """Splitting steepest descent (Liu, Wang, Wu 2019): split neurons along ``lambda_min(S_i)``.

    ``mode="exact"`` forms every splitting matrix and takes ``linalg.eigh``;
    ``mode="fast"`` (energy-aware splitting) never forms them and minimises
    the Rayleigh quotient from Hessian-vector products. The ``budget`` neurons
    with the most negative ``lambda_min`` over all layers split into
    ``theta +/- eps v`` with halved outgoing weights (function kept to O(eps^2)).
    ``only_negative=True`` splits only where ``lambda_min < 0`` (SSD's theory;
    the reference code does not check). A producer followed by a functional
    activation (``F.relu`` in ``forward``) cannot be scored: give the
    activation as a module, or a hand-written flow.
    """

    method = "ssd"

    def __init__(self, mode="exact", *, eps=0.01, seed=0, only_negative=False,
                 rayleigh_steps=200):
        super().__init__(seed=seed, only_negative=only_negative)
        self.mode = check_choice(mode, ("exact", "fast"), "mode")
        self.eps = _real(eps, "eps", low=0.0, low_open=True)
        self.rayleigh_steps = check_int(rayleigh_steps, "rayleigh_steps", minimum=1)

    def score(self, model, flows, batches, loss_fn, rng):
        modules = dict(model.named_modules())
        kinds = []
        for f in flows:
            kind = f.kind_of_activation(model)
            if f.activation is None and kind is not None and kind != "identity":
                raise GrowthError(
                    f"SSD cannot score {f.producer!r}: its activation ({kind}) is a function "
                    "call, not a module; use nn.ReLU()/nn.SiLU() modules or a hand-written flow"
                )
            if f.activation is not None and kind is None:
                act = modules[f.activation]
                raise GrowthError(
                    f"SSD cannot score {f.producer!r}: no second derivative is known for "
                    f"{type(act).__name__} (pass TorchFlow(activation_kind=...))"
                )
            kinds.append(kind or "identity")
        statistics = [[] for _ in flows]
        with scoring_mode(model):
            for inputs, targets in batches:
                capture = _Capture(model, flows)
                try:
                    loss = _check_loss(loss_fn(model(inputs), targets))
                finally:
                    capture.remove()
                missing = [f.producer for f, r in zip(flows, capture.records, strict=True)
                           if "h" not in r]
                if missing:
                    raise GrowthError(
                        f"SSD saw no activation output for {missing[0]!r}: its activation "
                        "module did not read its pre-activation (give the flow by hand)"
                    )
                hs = [r["h"] for r in capture.records]
                grads = torch.autograd.grad(loss, hs, allow_unused=True)
                for i, (f, record, g) in enumerate(zip(flows, capture.records, grads, strict=True)):
                    if g is None:
                        g = torch.zeros_like(record["h"])
                    if g.shape != record["z"].shape:
                        raise GrowthError(
                            f"SSD cannot score {f.producer!r}: the activation output "
                            f"{tuple(g.shape)} and pre-activation {tuple(record['z'].shape)} "
                            "differ in shape"
                        )
                    x = _patches(modules[f.producer], record["input"])
                    statistics[i].append((x, _positions(g.detach()), _positions(record["z"])))
        scores, directions = [], []
        for f, kind, stats in zip(flows, kinds, statistics, strict=True):
            lam, v = self._layer_split(f, kind, stats, modules, rng)
            scores.append(lam)
            directions.append(v)
        return scores, directions

    def _bn_scale(self, flow, modules):
        if flow.norm is None:
            return None
        bn = modules[flow.norm]
        if bn.running_var is None:
            raise GrowthError(
                f"SSD cannot score {flow.producer!r}: its norm {flow.norm!r} keeps no running "
                "statistics (track_running_stats=False), so the BN coefficient "
                "weight / sqrt(running_var + eps) is undefined"
            )
        var = bn.running_var.detach()
        scale = bn.weight.detach() if bn.weight is not None else torch.ones_like(var)
        return bn_coefficient(scale, var, eps=bn.eps)

    def _layer_split(self, flow, kind, stats, modules, rng):
        bn_scale = self._bn_scale(flow, modules)
        nb = len(stats)
        if self.mode == "exact":
            s = sum(splitting_matrices(x, g, z, activation=kind, bn_scale=bn_scale)
                    for x, g, z in stats) / nb
            s = _average_across_ranks(s)
            # float32 LAPACK eigh fails to converge on these low-rank, tiny-scaled matrices
            # (seen on torch CPU for VGG16 seeds); float64 is robust and n x d x d is small.
            lam, v = min_eigenpairs(s.to(torch.float64))
            return lam, v.to(s.dtype)
        hvps = [hvp_from_statistics(x, g, z, activation=kind, bn_scale=bn_scale)
                for x, g, z in stats]

        def hvp(v):
            return _average_across_ranks(sum(h(v) for h in hvps) / nb)

        return rayleigh_min_direction(hvp, hvps[0].n, hvps[0].d, rng=rng, like=hvps[0].like,
                                      steps=self.rayleigh_steps)

    def widen(self, params, core_flow, index, picks, state, rng):
        producer = params[core_flow.producer]
        v_min = state[index].to(dtype=producer.dtype, device=producer.device)
        return ssd_split(params, core_flow, picks, v_min, eps=self.eps)


# --------------------------------------------------------------------------- Firefly


class FireflyGrower(Grower):
    """Firefly neural architecture descent (Wu, Liu, Stone, Liu 2020).

    Candidates per layer (:func:`simcore.growth.firefly_candidates`): a split
    direction ``delta_i`` for every neuron (``theta_i +/- delta_i``, outgoing
    halved) and ``new_per_layer`` new neurons (incoming rows, small outgoing
    columns). All candidates of all layers are put into a temporary widened copy
    of the model (built with the same surgery, so depthwise convs, BatchNorm
    and flatten heads are handled like a real growth) and evaluated with
    ``torch.func.functional_call``; with ``train_candidates`` they are first
    trained for one pass over the batches (reference: RMSprop lr 1e-3, momentum
    0.1, alpha 0.9, L2 1e-2 on ``delta``, 1e-4 on new incoming rows). Each
    candidate's perturbation is scaled by a gate ``g``; its score is ``dL/dg`` at
    ``g = 1``, averaged over batches (and ranks). The ``budget`` most negative
    scores over all layers and both kinds are applied
    (:func:`simcore.growth.firefly_apply`). BatchNorm stays in eval mode
    throughout. The function moves by ``O(|delta|^2 + outgoing_scale)``.
    """

    method = "firefly"

    def __init__(self, *, new_per_layer=70, split=True, split_scale=0.1, incoming_std=0.1,
                 outgoing_scale=0.01, train_candidates=True, lr=1e-3, momentum=0.1,
                 alpha=0.9, l2_split=1e-2, l2_incoming=1e-4, seed=0, only_negative=False):
        super().__init__(seed=seed, only_negative=only_negative)
        self.new_per_layer = check_int(new_per_layer, "new_per_layer", minimum=0)
        self.split = bool(split)
        self.split_scale = _real(split_scale, "split_scale", low=0.0, low_open=True)
        self.incoming_std = _real(incoming_std, "incoming_std", low=0.0, low_open=True)
        self.outgoing_scale = _real(outgoing_scale, "outgoing_scale", low=0.0, low_open=True)
        self.train_candidates = bool(train_candidates)
        self.lr = _real(lr, "lr", low=0.0, low_open=True)
        self.momentum = _real(momentum, "momentum", low=0.0, high=1.0)
        self.alpha = _real(alpha, "alpha", low=0.0, high=1.0)
        self.l2_split = _real(l2_split, "l2_split", low=0.0)
        self.l2_incoming = _real(l2_incoming, "l2_incoming", low=0.0)

    def select(self, scores, budget, caps, state):
        """:func:`simcore.growth.firefly_select` over each layer's split and new candidates.

        ``scores[l]`` is the split candidates' scores followed by the new ones' (the report's
        layout); the candidates in ``state`` say where the split part ends.
        """
        split_scores, new_scores = [], []
        for s, c in zip(scores, state, strict=True):
            n_split = c.split_directions.shape[0] if c.split_directions is not None else 0
            split_scores.append(s[:n_split].numpy())
            new_scores.append(s[n_split:].numpy())
        try:
            return firefly_select(split_scores, new_scores, budget, caps=caps,
                                  only_negative=self.only_negative)
        except ValueError as error:
            if "exceeds" not in str(error):
                raise
            raise ValueError(f"Firefly candidates too few: {error}; raise new_per_layer or "
                             "lower ratio") from error

    def _selection_all(self, candidates):
        return [
            FireflySelection(
                np.arange(c.split_directions.shape[0] if c.split_directions is not None else 0),
                np.arange(c.new_count),
            )
            for c in candidates
        ]

    def score(self, model, flows, batches, loss_fn, rng):
        params = {k: v.detach() for k, v in model.state_dict().items()}
        core_flows = [f.channel_flow(model) for f in flows]
        candidates = firefly_candidates(
            params, core_flows, rng=rng, new_per_layer=self.new_per_layer, split=self.split,
            split_scale=self.split_scale, incoming_std=self.incoming_std,
            outgoing_scale=self.outgoing_scale,
        )
        select_all = self._selection_all(candidates)
        # A widened copy of the model with room for every candidate: only its structure is used.
        shadow = copy.deepcopy(model)
        widened, maps = firefly_apply(params, core_flows, candidates, select_all)
        for index in reversed(range(len(flows))):
            _commit(_growth_swaps(shadow, flows[index], widened, maps[index], None, "carry"))
        shadow.eval()
        for p in shadow.parameters():
            p.requires_grad_(False)

        def run(live, inputs):
            grown, _ = firefly_apply(params, core_flows, live, select_all)
            return torch.func.functional_call(shadow, grown, (inputs,))

        with scoring_mode(model):
            if self.train_candidates:
                candidates = self._train(candidates, run, batches, loss_fn)
            split_sums = [None] * len(flows)
            new_sums = [None] * len(flows)
            for inputs, targets in batches:
                gates, live = [], []
                for c in candidates:
                    gs = (torch.ones(c.split_directions.shape[0], dtype=c.new_incoming.dtype,
                                     device=c.new_incoming.device, requires_grad=True)
                          if c.split_directions is not None else None)
                    gn = torch.ones(c.new_count, dtype=c.new_incoming.dtype,
                                    device=c.new_incoming.device, requires_grad=True)
                    gates.append((gs, gn))
                    live.append(dataclasses.replace(
                        c,
                        split_directions=None if gs is None else gs[:, None] * c.split_directions,
                        new_outgoing=tuple(gn[:, None] * a for a in c.new_outgoing),
                    ))
                loss = _check_loss(loss_fn(run(live, inputs), targets))
                flat = [g for pair in gates for g in pair if g is not None]
                grads = iter(torch.autograd.grad(loss, flat, allow_unused=True))
                for index, (gs, gn) in enumerate(gates):
                    for sums, gate in ((split_sums, gs), (new_sums, gn)):
                        if gate is None:
                            continue
                        g = next(grads)
                        g = torch.zeros_like(gate) if g is None else g.detach()
                        sums[index] = g if sums[index] is None else sums[index] + g
        scores = []
        for index in range(len(candidates)):
            parts = [] if split_sums[index] is None else [split_sums[index]]
            scores.append(torch.cat([*parts, new_sums[index]]) / len(batches))
        return scores, candidates

    def _train(self, candidates, run, batches, loss_fn):
        """One pass of RMSprop over the candidate variables, everything else frozen."""
        leaves = []
        groups = []
        for c in candidates:
            delta = (None if c.split_directions is None
                     else c.split_directions.detach().clone().requires_grad_(True))
            incoming = c.new_incoming.detach().clone().requires_grad_(True)
            outgoing = tuple(a.detach().clone().requires_grad_(True) for a in c.new_outgoing)
            leaves.append((delta, incoming, outgoing))
            if delta is not None:
                groups.append({"params": [delta], "weight_decay": self.l2_split})
            groups.append({"params": [incoming], "weight_decay": self.l2_incoming})
            groups.append({"params": list(outgoing), "weight_decay": 0.0})
        optimizer = torch.optim.RMSprop(groups, lr=self.lr, momentum=self.momentum,
                                        alpha=self.alpha)
        variables = [p for g in groups for p in g["params"]]
        for inputs, targets in batches:
            live = [dataclasses.replace(c, split_directions=d, new_incoming=u, new_outgoing=a)
                    for c, (d, u, a) in zip(candidates, leaves, strict=True)]
            loss = _check_loss(loss_fn(run(live, inputs), targets))
            grads = torch.autograd.grad(loss, variables, allow_unused=True)
            for p, g in zip(variables, grads, strict=True):
                p.grad = _average_across_ranks(torch.zeros_like(p) if g is None else g)
            optimizer.step()
        return [dataclasses.replace(c, split_directions=None if d is None else d.detach(),
                                    new_incoming=u.detach(),
                                    new_outgoing=tuple(x.detach() for x in a))
                for c, (d, u, a) in zip(candidates, leaves, strict=True)]

    def plan(self, params, core_flows, picks, state, rng):
        """``picks``: one :class:`~simcore.growth.FireflySelection` per layer (from select)."""
        new_params, pairs = firefly_apply(params, core_flows, state, picks)
        maps = [pair if sel.count else None for pair, sel in zip(pairs, picks, strict=True)]
        return new_params, maps
