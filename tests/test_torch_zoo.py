"""The zoo of third-party-style architectures: every model builds and runs at any width."""

import pytest

torch = pytest.importorskip("torch")

from simcore.adapters.torch.zoo import NAMES, build  # noqa: E402


@pytest.mark.parametrize("name", NAMES)
def test_every_zoo_model_builds_and_runs_at_small_width(name):
    model = build(name, width=0.125, num_classes=7, seed=0).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", NAMES)
def test_every_zoo_model_traces_with_torch_fx(name):
    model = build(name, width=0.125, seed=0).eval()
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x))


def test_full_width_sizes_are_the_cifar_ones():
    counts = {name: sum(p.numel() for p in build(name).parameters())
              for name in ("resnet18", "resnet18_functional", "vgg11_bn", "mobilenet_v2")}
    assert counts["resnet18"] == counts["resnet18_functional"]
    assert 11.0e6 < counts["resnet18"] < 11.3e6  # the CIFAR ResNet18's 11.17M
    assert 9.2e6 < counts["vgg11_bn"] < 9.3e6  # CIFAR VGG11: 9.23M
    assert 2.2e6 < counts["mobilenet_v2"] < 2.4e6


def test_seed_reproduces_weights_and_leaves_the_global_random_state_alone():
    state = torch.random.get_rng_state()
    first, second = build("lenet", seed=3), build("lenet", seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    for a, b in zip(first.parameters(), second.parameters(), strict=True):
        assert torch.equal(a, b)


def test_width_scales_channels_and_bad_arguments_are_refused():
    assert build("vgg11", width=0.5).features[0].out_channels == 32
    assert build("vgg11", width=0.001).features[0].out_channels == 1
    with pytest.raises(ValueError, match="unknown zoo model 'alexnet'"):
        build("alexnet")
    with pytest.raises(ValueError, match="width must be a positive number"):
        build("lenet", width=0)
