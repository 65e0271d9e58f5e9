"""Growth is atomic against interruption: an exception at any line of the commit phase.

A ``KeyboardInterrupt`` (the CLI's second Ctrl-C raises at once) can land between any two
lines. ``sys.settrace`` raises it at the k-th line event inside ``adapters/torch/surgery.py``,
``adapters/torch/surgery_swaps.py`` and ``adapters/torch/optim.py`` (where the growth is planned,
committed and rolled back, the optimizer's remapping included), for k = 1, 2, ... until the
growth completes; after every interrupted attempt the model, its buffers and the optimizer must
be exactly as before, bit for bit, and the very same parameter objects.
"""

from __future__ import annotations

import copy
import dis
import functools
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from simcore.adapters.torch import optim as torch_optim  # noqa: E402
from simcore.adapters.torch import surgery, surgery_swaps  # noqa: E402
from simcore.adapters.torch.surgery import (  # noqa: E402
    GrowthTransaction,
    apply_growths,
    discover_flows,
)
from torch import nn  # noqa: E402

from simcore.growth import add_neurons, replicate_neurons  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")

TRACED_FILES = {surgery.__file__, surgery_swaps.__file__, torch_optim.__file__}

OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
    "adam": lambda params: torch.optim.Adam(params, lr=0.01),
}


def _tiny_trained(opt_kind):
    """Two growable flows (one with a BatchNorm), one frozen parameter, state from two steps."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(),
                          nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    model[5].bias.requires_grad_(False)  # held by no optimizer: skipped, never lost
    optimizer = OPTIMIZERS[opt_kind]([p for p in model.parameters() if p.requires_grad])
    x = torch.randn(8, 3)
    for _ in range(2):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model, optimizer


def _growth_plan(model):
    """Both flows grown in one dict, downstream first, as the growers plan them."""
    first, second = discover_flows(model)
    state = dict(model.state_dict())
    grown, second_map = replicate_neurons(state, second.channel_flow(model), [0, 3])
    grown, first_map = add_neurons(grown, first.channel_flow(model), 2,
                                   rng=np.random.default_rng(0))
    return [(second, second_map), (first, first_map)], grown


def _bits(value):
    if isinstance(value, torch.Tensor):
        flat = value.detach().cpu().contiguous().reshape(-1)
        return (str(value.dtype), tuple(value.shape), bytes(flat.view(torch.uint8).numpy()))
    if isinstance(value, dict):
        return {k: _bits(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_bits(v) for v in value]
    return value


def _snapshot(model, optimizer):
    """Everything a growth may touch, as comparable values (tensors as their raw bytes)."""
    return {
        "repr": repr(model),  # every in/out_features, in/out_channels, num_features
        "state_dict": _bits(dict(model.state_dict())),
        "parameters": [(name, id(p), p.requires_grad) for name, p in model.named_parameters()],
        "buffers": [(name, id(b)) for name, b in model.named_buffers()],
        "optimizer": _bits(optimizer.state_dict()),
        "optimizer_params": [[id(p) for p in g["params"]] for g in optimizer.param_groups],
        "optimizer_state": [(id(p), sorted(s)) for p, s in optimizer.state.items()],
    }


#: The functions that change the model or the optimizer: traced bytecode by bytecode too.
COMMIT_FUNCTIONS = {"apply_growths", "GrowthTransaction.apply", "GrowthTransaction.__exit__",
                    "_commit", "Swap.apply", "OptimizerGrowth.apply"}


@functools.cache
def _returning_offsets(code):
    """Offsets of a function's return bytecodes: the return value's load and the return.

    No call runs between them, so the interpreter never handles a signal there (it does at
    calls and backward jumps); the opcode-level test does not interrupt at them.
    """
    instructions = list(dis.get_instructions(code))
    offsets = set()
    for before, instruction in zip([None, *instructions[:-1]], instructions, strict=True):
        if instruction.opname in ("RETURN_VALUE", "RETURN_CONST"):
            offsets.add(instruction.offset)
            if before is not None and before.opname in ("LOAD_CONST", "LOAD_FAST"):
                offsets.add(before.offset)
    return frozenset(offsets)


class _InterruptAtLine:
    """A tracer raising KeyboardInterrupt at the k-th line event in ``TRACED_FILES``.

    With ``opcodes``, every bytecode of :data:`COMMIT_FUNCTIONS` counts as an event too (a
    signal is handled between bytecodes, not only at line starts).
    """

    def __init__(self, k, opcodes=False):
        self.k, self.seen, self.where, self.opcodes = k, 0, None, opcodes

    def __call__(self, frame, event, arg):
        if frame.f_code.co_filename not in TRACED_FILES:
            return None
        if self.opcodes and frame.f_code.co_qualname in COMMIT_FUNCTIONS:
            frame.f_trace_opcodes = True
        lines_in_frame = 0

        def line(frame, event, arg):
            nonlocal lines_in_frame
            returning = event == "opcode" and frame.f_lasti in _returning_offsets(frame.f_code)
            if event == "line" or (event == "opcode" and not returning):
                self.seen += 1
                lines_in_frame += 1
                if self.seen == self.k:
                    # (function, its n-th line event): CPython unsets the tracer on the raise
                    self.where = (frame.f_code.co_qualname, lines_in_frame)
                    raise KeyboardInterrupt(f"line event {self.k}")
            return line

        return line


def _interrupted_growth(grow, template, k, opcodes=False):
    """Run ``grow`` on a fresh copy of ``template`` with an interrupt at line event ``k``.

    Returns ``(where the interrupt landed or None, before, after, model, optimizer)``.
    """
    model, optimizer = copy.deepcopy(template)
    before = _snapshot(model, optimizer)
    tracer = _InterruptAtLine(k, opcodes)
    sys.settrace(tracer)
    try:
        grow(model, optimizer)
    except KeyboardInterrupt:
        assert tracer.where is not None
    finally:
        sys.settrace(None)
    return tracer.where, before, _snapshot(model, optimizer), model, optimizer


def _with_apply_growths(template, mode):
    growths, grown = _growth_plan(template[0])  # by module name: valid for every copy

    def grow(model, optimizer):
        apply_growths(model, growths, grown, optimizer, optimizer_mode=mode, lr=0.05)
    return grow


def _with_transaction(template, mode):
    growths, grown = _growth_plan(template[0])

    def grow(model, optimizer):
        transaction = GrowthTransaction(model, optimizer, optimizer_mode=mode, lr=0.05)
        with transaction:
            for flow, channel_map in growths:
                transaction.apply(flow, grown, channel_map)
    return grow


def _assert_grown(model, optimizer):
    assert (model[0].out_features, model[1].num_features, model[3].out_features) == (6, 6, 7)
    assert (model[3].in_features, model[5].in_features) == (6, 7)
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert held == {id(p) for p in model.parameters() if p.requires_grad}
    assert all(g["lr"] == 0.05 for g in optimizer.param_groups)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()


def _every_interruption_is_rolled_back(grow, template, committed_at=(), opcodes=False):
    """Interrupt at line event 1, 2, ... until the growth completes; returns the event count.

    An interrupt must leave everything as before, except at a point in ``committed_at``
    (qualified function name, n-th line event of its call): there the growth is complete and
    must be whole.
    """
    k = 0
    while True:
        k += 1
        assert k < 5000, "the growth never completed"
        where, before, after, model, optimizer = _interrupted_growth(grow, template, k, opcodes)
        if where is None:
            break
        if where in committed_at:
            _assert_grown(model, optimizer)
            continue
        assert after == before, f"state changed after an interrupt at {where} (line event {k})"
    assert after != before
    _assert_grown(model, optimizer)
    return k - 1


@pytest.mark.slow  # one interrupt per line of the commit; the fast tier keeps the block test
@pytest.mark.parametrize("mode", ["carry", "fresh"])
@pytest.mark.parametrize("opt_kind", ["sgd", "adam"])
def test_an_interrupt_at_any_line_of_the_commit_leaves_everything_bit_for_bit(opt_kind, mode):
    template = _tiny_trained(opt_kind)
    lines = _every_interruption_is_rolled_back(_with_apply_growths(template, mode), template)
    assert lines > 100  # the commit phase and the optimizer's remapping were traced


@pytest.mark.slow
def test_an_interrupt_at_any_bytecode_of_the_commit_leaves_everything_bit_for_bit():
    template = _tiny_trained("adam")
    _every_interruption_is_rolled_back(_with_apply_growths(template, "carry"), template,
                                       opcodes=True)


@pytest.mark.parametrize("mode", ["carry", "fresh"])
def test_an_interrupt_inside_a_growth_transaction_block_is_rolled_back(mode):
    # The first line of ``__exit__`` after a block that completed runs before any handler can:
    # the block's growth is then committed, and must be whole.
    template = _tiny_trained("adam")
    _every_interruption_is_rolled_back(_with_transaction(template, mode), template,
                                       committed_at={("GrowthTransaction.__exit__", 1)})


def test_rollback_is_idempotent_and_a_second_rollback_changes_nothing():
    model, optimizer = _tiny_trained("sgd")
    before = _snapshot(model, optimizer)
    growths, grown = _growth_plan(model)
    transaction = GrowthTransaction(model, optimizer)
    for flow, channel_map in growths:
        transaction.apply(flow, grown, channel_map)
    assert _snapshot(model, optimizer) != before
    transaction.rollback()
    assert _snapshot(model, optimizer) == before
    transaction.rollback()
    assert _snapshot(model, optimizer) == before


def test_an_unapplied_optimizer_change_undoes_to_nothing():
    model, optimizer = _tiny_trained("adam")
    before = _snapshot(model, optimizer)
    flow = discover_flows(model)[1]
    core_flow = flow.channel_flow(model)
    grown, channel_map = replicate_neurons(dict(model.state_dict()), core_flow, [0, 3])
    parameters = dict(model.named_parameters())
    replaced = {name: (parameters[name], nn.Parameter(grown[name].clone()))
                for name in core_flow.names()}
    change = torch_optim.plan_optimizer_growth(optimizer, replaced, core_flow, channel_map)
    change.undo()  # never applied: nothing to undo, and no error
    assert _snapshot(model, optimizer) == before
    change.apply()
    assert _snapshot(model, optimizer) != before
    change.undo()
    change.undo()
    assert _snapshot(model, optimizer) == before


@pytest.mark.parametrize("seed, error", [(-1, ValueError), (1.5, TypeError), (True, TypeError)])
def test_a_bad_seed_is_refused_before_anything_changes(seed, error):
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    flow = discover_flows(net)[0]
    grown, cmap = add_neurons(dict(net.state_dict()), flow.channel_flow(net), 2, rng=0)
    with pytest.raises(error, match="seed"):
        surgery.apply_growth(net, flow, grown, cmap, seed=seed)
    with pytest.raises(error, match="seed"):
        GrowthTransaction(net, seed=seed)
    assert net[0].out_features == 4
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])
