"""Checkpoints of grown models: round trip, exact resume, weights_only, errors."""

import random

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from simcore.adapters.torch import (  # noqa: E402
    grow_optimizer,
    load_checkpoint,
    mobilenet_v1,
    save_checkpoint,
    vgg16,
    widths,
)
from torch import nn  # noqa: E402

from simcore.growth import BatchNorm, ChannelFlow, Consumer, add_neurons  # noqa: E402

# Non-uniform widths, as after two growths of the width-4 seed.
GROWN = [4, 6, 5, 4, 7, 4, 4, 5, 4, 6, 4, 4, 5]


def _sgd(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)


def _cosine(optimizer):
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=7)


def _step(model, optimizer, scheduler):
    """One training step whose data draws on all three global RNGs (what a resume restores)."""
    x = torch.randn(2, 3, 32, 32)
    if random.random() < 0.5:
        x = x.flip(-1)
    noise = np.random.normal(0.0, 0.1, size=x.shape)  # noqa: NPY002 - the global stream
    x = x + torch.from_numpy(noise.astype(np.float32))
    y = torch.randint(0, 10, (2,))
    optimizer.zero_grad()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    scheduler.step()
    return loss.item()


def _seed(seed):
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - the legacy global generator is what is restored


def test_round_trip_of_a_grown_model(tmp_path):
    _seed(0)
    model = vgg16(width=GROWN)
    optimizer, extra = _sgd(model.parameters()), {"epoch": 100, "growths": [50, 100]}
    scheduler = _cosine(optimizer)
    model.train()
    _step(model, optimizer, scheduler)
    path = tmp_path / "grown.pt"
    save_checkpoint(path, model, optimizer, scheduler, extra=extra)
    assert not (tmp_path / "grown.pt.tmp").exists()

    restored = load_checkpoint(path, optimizer=_sgd, scheduler=_cosine)
    assert widths(restored.model) == GROWN
    assert restored.extra == extra
    assert restored.architecture["builder"] == "vgg16"
    saved, loaded = model.state_dict(), restored.model.state_dict()
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)  # BN running stats included
    assert restored.scheduler.last_epoch == scheduler.last_epoch == 1
    assert restored.optimizer.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
    for p, q in zip(model.parameters(), restored.model.parameters(), strict=True):
        assert torch.equal(optimizer.state[p]["momentum_buffer"],
                           restored.optimizer.state[q]["momentum_buffer"])
    # Everything in the file loads under weights_only=True (no pickled code).
    payload = torch.load(path, weights_only=True)
    assert payload["architecture"]["kwargs"]["width"] == GROWN


def test_resume_continues_bitwise(tmp_path):
    k, m = 2, 2
    _seed(1)
    model = vgg16(width=GROWN)
    optimizer = _sgd(model.parameters())
    scheduler = _cosine(optimizer)
    for _ in range(k):
        _step(model, optimizer, scheduler)
    save_checkpoint(tmp_path / "k.pt", model, optimizer, scheduler)
    straight = [_step(model, optimizer, scheduler) for _ in range(m)]

    _seed(99)  # whatever happened since, the checkpoint restores the RNG streams
    resumed = load_checkpoint(tmp_path / "k.pt", optimizer=_sgd, scheduler=_cosine)
    again = [_step(resumed.model, resumed.optimizer, resumed.scheduler) for _ in range(m)]
    assert again == straight
    for p, q in zip(model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(p, q)
    for a, b in zip(model.buffers(), resumed.model.buffers(), strict=True):
        assert torch.equal(a, b)
    assert resumed.optimizer.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]

    _seed(99)  # without the RNG restore the data differ, so the test above can fail
    other = load_checkpoint(tmp_path / "k.pt", optimizer=_sgd, scheduler=_cosine,
                            restore_rng=False)
    assert _step(other.model, other.optimizer, other.scheduler) != straight[0]


VGG_CONVS = [0, 3, 7, 10, 14, 17, 20, 24, 27, 30, 34, 37, 40]


def _grow_vgg_layer(model, optimizer, k, count, seed):
    """Add ``count`` neurons to conv ``k`` of a VGG16 with the core's operator, write them into
    the model by hand (flows follow the documented naming) and carry the optimizer state."""
    i = VGG_CONVS[k]
    consumer = f"features.{VGG_CONVS[k + 1]}" if k + 1 < len(VGG_CONVS) else "classifier"
    bn = f"features.{i + 1}"
    flow = ChannelFlow(
        f"features.{i}.weight",
        norm=BatchNorm(f"{bn}.weight", f"{bn}.bias", f"{bn}.running_mean", f"{bn}.running_var"),
        consumers=(Consumer(f"{consumer}.weight"),),
    )
    grown, cmap = add_neurons(dict(model.state_dict()), flow, count,
                              rng=np.random.default_rng(seed))
    replaced = {}
    for name in flow.names():
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        if attr in module._parameters:
            replaced[name] = (module._parameters[attr], nn.Parameter(grown[name].clone()))
            module._parameters[attr] = replaced[name][1]
        else:
            module._buffers[attr] = grown[name].clone()
    channels = cmap.new_channels
    model.features[i].out_channels = model.get_submodule(bn).num_features = channels
    model.get_submodule(consumer).in_channels = channels
    grow_optimizer(optimizer, replaced, flow, cmap)


def test_twice_grown_model_with_carried_state_resumes_exactly(tmp_path):
    _seed(3)
    model = vgg16(width=4)
    optimizer = _sgd(model.parameters())
    scheduler = _cosine(optimizer)
    _step(model, optimizer, scheduler)
    _grow_vgg_layer(model, optimizer, 2, 3, seed=0)
    _step(model, optimizer, scheduler)
    _grow_vgg_layer(model, optimizer, 12, 2, seed=1)
    _step(model, optimizer, scheduler)
    assert widths(model) == [4, 4, 7] + [4] * 9 + [6]
    save_checkpoint(tmp_path / "g.pt", model, optimizer, scheduler, extra={"growths": 2})
    straight = [_step(model, optimizer, scheduler) for _ in range(2)]
    resumed = load_checkpoint(tmp_path / "g.pt", optimizer=_sgd, scheduler=_cosine)
    assert widths(resumed.model) == [4, 4, 7] + [4] * 9 + [6]
    again = [_step(resumed.model, resumed.optimizer, resumed.scheduler) for _ in range(2)]
    assert again == straight
    for p, q in zip(model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_mobilenet_and_adam_round_trip(tmp_path):
    _seed(2)
    ws = [8, 9, 8, 10, 8, 8, 11, 8, 8, 8, 12, 8, 8, 13]
    model = mobilenet_v1(width=ws, activation="relu", num_classes=5)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    save_checkpoint(tmp_path / "m.pt", model, optimizer)
    restored = load_checkpoint(tmp_path / "m.pt",
                               optimizer=lambda ps: torch.optim.Adam(ps, lr=1e-3))
    assert widths(restored.model) == ws and restored.model.activation == "relu"
    assert restored.model.num_classes == 5
    q = next(restored.model.parameters())
    assert restored.optimizer.state[q]["step"].item() == 1


def test_custom_model_with_a_description_and_a_builder(tmp_path):
    model = nn.Sequential(nn.Linear(3, 7), nn.ReLU(), nn.Linear(7, 2))
    save_checkpoint(tmp_path / "tree.pt", model)
    with pytest.raises(ValueError, match="model="):  # no builder makes a module tree
        load_checkpoint(tmp_path / "tree.pt")
    description = {"builder": "mlp", "kwargs": {"hidden": 7}}
    save_checkpoint(tmp_path / "c.pt", model, architecture=description)

    def mlp(hidden):
        return nn.Sequential(nn.Linear(3, hidden), nn.ReLU(), nn.Linear(hidden, 2))

    restored = load_checkpoint(tmp_path / "c.pt", builders={"mlp": mlp})
    assert torch.equal(restored.model[0].weight, model[0].weight)
    with pytest.raises(ValueError, match="builder"):
        load_checkpoint(tmp_path / "c.pt")


def test_errors(tmp_path):
    model = vgg16(width=4)
    with pytest.raises(TypeError, match=r"extra\['when'\]"):
        save_checkpoint(tmp_path / "e.pt", model, extra={"when": object()})
    with pytest.raises(TypeError, match="optimizer"):
        save_checkpoint(tmp_path / "e.pt", model, optimizer="sgd")
    save_checkpoint(tmp_path / "e.pt", model)
    with pytest.raises(ValueError, match="no optimizer state"):
        load_checkpoint(tmp_path / "e.pt", optimizer=_sgd)
    with pytest.raises(ValueError, match="needs an optimizer"):
        load_checkpoint(tmp_path / "e.pt", scheduler=_cosine)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a simcore"):
        load_checkpoint(tmp_path / "other.pt")
    # An optimizer built over the parameters in another order is caught, not silently mixed.
    optimizer = _sgd(model.parameters())
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    save_checkpoint(tmp_path / "o.pt", model, optimizer)
    with pytest.raises(ValueError, match="order"):
        load_checkpoint(tmp_path / "o.pt", optimizer=lambda ps: _sgd(list(ps)[::-1]))


def test_adafactor_with_factored_state_round_trips(tmp_path):
    # Adafactor keeps row/column variances whose shapes differ from their parameter's.
    _seed(4)
    model = vgg16(width=4)
    optimizer = torch.optim.Adafactor(model.parameters(), lr=1e-2)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    conv = model.features[0].weight
    assert optimizer.state[conv]["row_var"].shape != conv.shape
    save_checkpoint(tmp_path / "a.pt", model, optimizer)
    restored = load_checkpoint(tmp_path / "a.pt",
                               optimizer=lambda ps: torch.optim.Adafactor(ps, lr=1e-2))
    for p, q in zip(model.parameters(), restored.model.parameters(), strict=True):
        saved, loaded = optimizer.state[p], restored.optimizer.state[q]
        assert saved.keys() == loaded.keys()
        assert all(torch.equal(saved[k], loaded[k]) for k in saved)


def _swap_bn_weight_and_bias(params):
    params = list(params)  # features.0.weight, features.1.weight, features.1.bias, ...
    params[1], params[2] = params[2], params[1]
    return _sgd(params)


def _saved_after_a_step(path):
    """A width-4 VGG16 and its SGD after one step, saved to ``path``."""
    model = vgg16(width=4)
    optimizer = _sgd(model.parameters())
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    save_checkpoint(path, model, optimizer)
    return model, optimizer


def test_optimizer_over_swapped_same_shaped_parameters_is_refused(tmp_path):
    model, _ = _saved_after_a_step(tmp_path / "s.pt")
    with pytest.raises(ValueError, match=r"'features.1.bias' at position 1 .*'features.1.weight'"
                                         r".*order"):
        load_checkpoint(tmp_path / "s.pt", optimizer=_swap_bn_weight_and_bias)
    with pytest.raises(ValueError, match="param groups of sizes"):
        load_checkpoint(tmp_path / "s.pt", optimizer=lambda ps: _sgd(list(ps)[:-1]))
    # The saved order, whatever it was, is the one a resume needs.
    swapped = _swap_bn_weight_and_bias(model.parameters())
    save_checkpoint(tmp_path / "w.pt", model, swapped)
    assert load_checkpoint(tmp_path / "w.pt", optimizer=_swap_bn_weight_and_bias).optimizer
    with pytest.raises(ValueError, match="order"):
        load_checkpoint(tmp_path / "w.pt", optimizer=_sgd)


def test_optimizer_that_cannot_be_stored_fails_at_save_time(tmp_path):
    model = vgg16(width=4)
    optimizer = _sgd(model.parameters())
    optimizer.param_groups[0]["note"] = object()  # would not load under weights_only=True
    with pytest.raises(TypeError, match=r"optimizer.state_dict\(\).*note"):
        save_checkpoint(tmp_path / "n.pt", model, optimizer)
    assert not (tmp_path / "n.pt").exists()
    stranger = _sgd([*model.parameters(), nn.Parameter(torch.zeros(3))])
    with pytest.raises(ValueError, match="not a parameter of the model"):
        save_checkpoint(tmp_path / "n.pt", model, stranger)


# --------------------------------------------------------------------------- untrusted files


def _data_offsets(path):
    """(start, size) of every stored tensor's bytes in a torch.save zip file."""
    import struct
    import zipfile

    raw = path.read_bytes()
    spans = []
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if "/data/" not in info.filename or info.file_size == 0:
                continue
            name_length, extra_length = struct.unpack("<HH", raw[info.header_offset + 26:
                                                                 info.header_offset + 30])
            spans.append((info.header_offset + 30 + name_length + extra_length, info.file_size))
    return spans


def test_a_flipped_byte_in_tensor_data_is_refused(tmp_path):
    model = vgg16(width=4)
    path = tmp_path / "c.pt"
    save_checkpoint(path, model, _sgd(model.parameters()))
    start, size = max(_data_offsets(path), key=lambda span: span[1])
    raw = bytearray(path.read_bytes())
    raw[start + size // 2] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="(?i)content hash"):
        load_checkpoint(path)


def test_a_declared_width_is_checked_against_the_weights_before_allocating(tmp_path):
    path = tmp_path / "wide.pt"
    # A small file that declares a wide model (its hash is right: anyone can compute one).
    save_checkpoint(path, vgg16(width=4),
                    architecture={"builder": "vgg16", "kwargs": {"width": 1024}})
    assert path.stat().st_size < 200_000
    built_on = []

    def spy(**kwargs):
        built_on.append(torch.empty(0).device.type)
        assert built_on[-1] == "meta", "a model was allocated before the widths were checked"
        return vgg16(**kwargs)

    with pytest.raises(ValueError, match=r"features\.0\.weight.*shape"):
        load_checkpoint(path, builders={"vgg16": spy})
    assert built_on == ["meta"]


@pytest.mark.parametrize("forge", [
    lambda p: {k: v for k, v in p.items() if k != "architecture"},
    lambda p: {**p, "architecture": "vgg16"},
    lambda p: {**p, "architecture": {"builder": "vgg16", "kwargs": [4]}},
    lambda p: {**p, "architecture": {"builder": ["vgg16"], "kwargs": {}}},
    lambda p: {**p, "model": [1, 2]},
    lambda p: {**p, "rng": {"python": 1}},
    lambda p: {**p, "optimizer_params": "x"},
    lambda p: {k: v for k, v in p.items() if k != "rng"},
], ids=["no-architecture", "architecture-str", "kwargs-list", "builder-list", "model-list",
        "rng-forged", "optimizer-params-str", "no-rng"])
def test_forged_fields_give_a_clear_error(tmp_path, forge):
    from simcore.adapters.torch import checkpoint

    model = vgg16(width=4)
    save_checkpoint(tmp_path / "c.pt", model, _sgd(model.parameters()))
    payload = torch.load(tmp_path / "c.pt", weights_only=True)
    forged = forge(payload)
    if hasattr(checkpoint, "content_digest"):  # a forger recomputes the hash: anyone can
        forged = {**forged, "digest": checkpoint.content_digest(forged)}
    torch.save(forged, tmp_path / "f.pt")
    with pytest.raises(ValueError, match="c.pt|f.pt"):
        load_checkpoint(tmp_path / "f.pt", optimizer=_sgd)


def test_deeply_nested_extra_gives_a_clear_error_or_loads(tmp_path):
    import sys

    nested = []
    for _ in range(5000):
        nested = [nested]
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(20_000)
    try:
        save_checkpoint(tmp_path / "deep.pt", vgg16(width=4), extra=nested)
    except (RecursionError, TypeError):
        pytest.skip("cannot write the deep file here")
    finally:
        sys.setrecursionlimit(limit)
    try:
        restored = load_checkpoint(tmp_path / "deep.pt", restore_rng=False)
    except ValueError as error:  # a clear refusal is fine; a RecursionError is not
        assert "deep.pt" in str(error)
    else:
        assert isinstance(restored.extra, list)


def test_an_optimizer_of_another_kind_is_refused_at_load(tmp_path):
    _saved_after_a_step(tmp_path / "c.pt")
    with pytest.raises(ValueError, match="SGD.*Adam|Adam.*SGD"):
        load_checkpoint(tmp_path / "c.pt", optimizer=lambda ps: torch.optim.Adam(ps, lr=1e-3))
    load_checkpoint(tmp_path / "c.pt", optimizer=_sgd)


def test_a_file_of_the_previous_format_still_loads(tmp_path):
    from simcore.adapters.torch import checkpoint

    model = vgg16(width=4)
    optimizer = _sgd(model.parameters())
    save_checkpoint(tmp_path / "c.pt", model, optimizer, extra={"epoch": 3})
    payload = torch.load(tmp_path / "c.pt", weights_only=True)
    old = {k: v for k, v in payload.items() if k not in ("digest", "optimizer_kind")}
    torch.save({**old, "format": checkpoint.PREVIOUS_FORMAT}, tmp_path / "old.pt")
    restored = load_checkpoint(tmp_path / "old.pt", optimizer=_sgd)
    assert restored.extra == {"epoch": 3}
    assert torch.equal(restored.model.features[0].weight, model.features[0].weight)


def _grown_zoo_model(name):
    from simcore.adapters.torch import RandomGrower
    from simcore.adapters.torch.zoo import build

    model = build(name, width=0.125, seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    report = RandomGrower(seed=0).grow(model, None, None, optimizer, ratio=0.5,
                                       example_input=x[:1])
    assert report.total_added > 0
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    return model, optimizer, x, y


@pytest.mark.parametrize("name", ["vgg11_bn", "mobilenet_v2"])
def test_a_grown_zoo_model_reloads_from_its_constructor(tmp_path, name):
    from simcore.adapters.torch.zoo import build

    model, optimizer, x, y = _grown_zoo_model(name)
    save_checkpoint(tmp_path / "z.pt", model, optimizer)
    restored = load_checkpoint(tmp_path / "z.pt", model=build(name, width=0.125, seed=1),
                               optimizer=lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9))
    saved, loaded = model.state_dict(), restored.model.state_dict()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    model.eval()
    restored.model.eval()
    assert torch.equal(model(x), restored.model(x))
    for p, q in zip(model.parameters(), restored.model.parameters(), strict=True):
        assert torch.equal(optimizer.state[p]["momentum_buffer"],
                           restored.optimizer.state[q]["momentum_buffer"])
    # Both train on identically from here (same dropout draws).
    for net, opt in ((model, optimizer), (restored.model, restored.optimizer)):
        torch.manual_seed(5)
        net.train()
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    assert all(torch.equal(p, q) for p, q in
               zip(model.parameters(), restored.model.parameters(), strict=True))


def test_recorded_layer_sizes_are_checked_before_allocating(tmp_path):
    from simcore.adapters.torch import checkpoint

    model = nn.Sequential(nn.Linear(3, 9), nn.ReLU(), nn.Linear(9, 2))
    save_checkpoint(tmp_path / "c.pt", model)
    payload = torch.load(tmp_path / "c.pt", weights_only=True)
    forged = {**payload, "layers": {**payload["layers"],
                                    "0": {**payload["layers"]["0"], "out_features": 10**9}}}
    torch.save({**forged, "digest": checkpoint.content_digest(forged)}, tmp_path / "f.pt")
    fresh = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="f.pt.*out_features|f.pt.*shape"):
        load_checkpoint(tmp_path / "f.pt", model=fresh)
    assert fresh[0].out_features == 4 and fresh[0].weight.shape == (4, 3)  # untouched
    # Another architecture is refused by module, before anything changes.
    other = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="'0'.*Conv2d|Conv2d.*'0'"):
        load_checkpoint(tmp_path / "c.pt", model=other)
    assert other[0].out_channels == 4
    # A file of format 3 has no layer sizes: it loads through its builder only.
    old = {k: v for k, v in payload.items() if k not in ("digest", "layers")}
    old = {**old, "format": checkpoint.FORMAT_3}
    torch.save({**old, "digest": checkpoint.content_digest(old)}, tmp_path / "old.pt")
    with pytest.raises(ValueError, match="layer sizes"):
        load_checkpoint(tmp_path / "old.pt", model=fresh)
