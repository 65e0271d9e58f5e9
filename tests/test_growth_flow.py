"""ChannelFlow: the description of where a producer's channels go, and its validation."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import growth_nets  # noqa: E402

from simcore.growth import BatchNorm, ChannelFlow, Consumer, Depthwise, FlowEntry  # noqa: E402


def _params():
    rng = np.random.default_rng(0)
    return {
        "pw.weight": rng.normal(size=(6, 3, 1, 1)),
        "pw.bias": np.zeros(6),
        "bn.g": np.ones(6),
        "bn.b": np.zeros(6),
        "bn.m": np.zeros(6),
        "bn.v": np.ones(6),
        "dw.weight": rng.normal(size=(6, 1, 3, 3)),
        "dw.bias": np.zeros(6),
        "dwbn.g": np.ones(6),
        "next.weight": rng.normal(size=(4, 6, 1, 1)),
        "fc.weight": rng.normal(size=(2, 6 * 9)),
        "other": np.ones(3),
        "five.dw": np.ones((5, 1, 3, 3)),
    }


def _flow(**changes):
    fields = dict(
        producer="pw.weight",
        bias="pw.bias",
        norm=BatchNorm("bn.g", "bn.b", "bn.m", "bn.v"),
        depthwise=(Depthwise("dw.weight", bias="dw.bias", norm=BatchNorm(scale="dwbn.g")),),
        consumers=(Consumer("next.weight"), Consumer("fc.weight", spatial=9)),
    )
    fields.update(changes)
    return ChannelFlow(**fields)


def test_channels_and_entries_in_flow_order(backend):
    params = {k: backend.asarray(v) for k, v in _params().items()}
    flow = _flow()
    assert flow.channels(params) == 6
    entries = flow.entries(params)
    assert [(e.name, e.role) for e in entries] == [
        ("pw.weight", "producer"),
        ("pw.bias", "bias"),
        ("bn.g", "scale"),
        ("bn.b", "shift"),
        ("bn.m", "mean"),
        ("bn.v", "var"),
        ("dw.weight", "depthwise"),
        ("dw.bias", "bias"),
        ("dwbn.g", "scale"),
        ("next.weight", "consumer"),
        ("fc.weight", "consumer"),
    ]
    assert entries[-1] == FlowEntry("fc.weight", "consumer", 1, 9, False)
    assert flow.names() == tuple(e.name for e in entries)


def test_every_network_of_the_growth_helpers_validates(backend):
    for name in growth_nets.NETS:
        net = growth_nets.build(name)
        params = growth_nets.on_backend(backend, net.params)
        for flow in net.flows:
            n = flow.channels(params)
            producer = net.params[flow.producer]
            assert n == producer.shape[flow.out_axis]


def test_negative_axes_are_normalised():
    params = {"k": np.ones((3, 3, 2, 5)), "d": np.ones((5, 4)), "dw": np.ones((3, 3, 1, 5))}
    flow = ChannelFlow(
        "k",
        out_axis=-1,
        depthwise=(Depthwise("dw", channel_axis=-1),),
        consumers=(Consumer("d", in_axis=0),),
    )
    assert [e.axis for e in flow.entries(params)] == [3, 3, 0]


def test_lists_become_tuples_and_flows_are_hashable():
    flow = ChannelFlow("w", consumers=[Consumer("v")])
    assert isinstance(flow.consumers, tuple)
    assert hash(flow) == hash(ChannelFlow("w", consumers=(Consumer("v"),)))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"producer": "nope"}, "producer entry 'nope' of the flow is missing"),
        ({"bias": "missing.bias"}, "bias entry 'missing.bias'"),
        ({"bias": "other"}, r"bias entry 'other' must have shape \(6,\)"),
        ({"norm": BatchNorm(var="other")}, "var entry 'other'"),
        (
            {"consumers": (Consumer("fc.weight", spatial=8),)},
            "consumer entry 'fc.weight'.*spatial 8",
        ),
        ({"consumers": (Consumer("next.weight", in_axis=0),)}, "consumer entry 'next.weight'"),
        ({"consumers": (Consumer("next.weight", in_axis=7),)}, "in_axis of consumer 'next.weight'"),
        ({"out_axis": 5}, "out_axis of producer 'pw.weight'"),
        ({"out_axis": 1}, "'pw.bias'"),  # 3 channels along axis 1: the bias (6,) disagrees
        ({"depthwise": (Depthwise("dw.weight", channel_axis=1),)}, "depthwise entry 'dw.weight'"),
        ({"depthwise": (Depthwise("five.dw"),)}, "depthwise entry 'five.dw' has size 5"),
        ({"producer": "pw.bias", "bias": None}, "at least 2 dimensions"),
    ],
)
def test_mismatches_raise_value_errors_naming_the_entry(change, message):
    with pytest.raises(ValueError, match=message):
        _flow(**change).channels(_params())


def test_type_errors():
    params = _params()
    with pytest.raises(TypeError, match="params must be a Mapping"):
        _flow().channels(list(params.items()))
    with pytest.raises(TypeError, match=r"params\['pw.bias'\] must be an array"):
        _flow().channels({**params, "pw.bias": [0.0] * 6})
    with pytest.raises(TypeError, match="real floating"):
        _flow().channels({**params, "pw.bias": np.zeros(6, dtype=np.int64)})
    with pytest.raises(TypeError, match="producer"):
        ChannelFlow(3)
    with pytest.raises(TypeError, match="out_axis"):
        ChannelFlow("w", out_axis=0.0)
    with pytest.raises(TypeError, match="Consumer objects"):
        ChannelFlow("w", consumers=("v",))
    with pytest.raises(TypeError, match="BatchNorm"):
        ChannelFlow("w", norm={"scale": "g"})
    with pytest.raises(TypeError, match="channels_last"):
        Consumer("v", channels_last=1)
    with pytest.raises(ValueError, match="spatial"):
        Consumer("v", spatial=0)
    with pytest.raises(ValueError, match="more than once"):
        ChannelFlow("w", consumers=(Consumer("v"), Consumer("v")))


def test_mixed_libraries_are_rejected(backend):
    if backend.name == "numpy":
        pytest.skip("needs a second library")
    params = dict(_params())
    params["pw.weight"] = backend.asarray(params["pw.weight"])
    with pytest.raises(TypeError, match="different array library"):
        _flow().channels(params)
