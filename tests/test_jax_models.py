"""The Flax seeds (VGG16, MobileNetV1) against the PyTorch ones: sizes, layers, and function.

Parameter counts are compared at the paper's widths and at per-layer width lists; the
function is compared by copying a PyTorch seed's weights and running statistics into the
Flax variables and checking the logits (eval mode) on the same images, NCHW for torch and
NHWC for Flax: a different padding, stride, pooling, activation or layer order fails it.
"""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
torch = pytest.importorskip("torch")
pytest.importorskip("flax")

import jax.numpy as jnp  # noqa: E402
from simcore.adapters.jax import models as flax_models  # noqa: E402
from simcore.adapters.torch import models as torch_models  # noqa: E402

BUILDERS = {"vgg16": 13, "mobilenet_v1": 14}


def _shapes(model, batch=1):
    return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((batch, 32, 32, 3)))


def _torch_count(model):
    return sum(p.numel() for p in model.parameters())


def test_paper_seeds_have_the_papers_parameter_counts():
    assert flax_models.parameter_count(_shapes(flax_models.vgg16())) == 28666
    assert flax_models.parameter_count(_shapes(flax_models.mobilenet_v1())) == 19978


@pytest.mark.parametrize("name", sorted(BUILDERS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_parameter_counts_equal_torchs_at_any_widths(name, seed):
    rng = np.random.default_rng(seed)
    width = [int(w) for w in rng.integers(1, 40, size=BUILDERS[name])]
    classes = int(rng.integers(2, 20))
    flax_model = getattr(flax_models, name)(num_classes=classes, width=width)
    torch_model = getattr(torch_models, name)(num_classes=classes, width=width)
    assert flax_models.parameter_count(_shapes(flax_model)) == _torch_count(torch_model)
    assert flax_models.widths(flax_model) == torch_models.widths(torch_model) == width


def _forward_order(name):
    """The Flax seed's conv and BatchNorm names in forward order (the module docstring's)."""
    if name == "vgg16":
        return [f"conv{k}" for k in range(13)] + ["classifier"], [f"bn{k}" for k in range(13)]
    blocks = range(1, 14)
    convs = ["conv0"] + [n for b in blocks for n in (f"dw{b}", f"conv{b}")] + ["classifier"]
    return convs, ["bn0"] + [n for b in blocks for n in (f"dw{b}_bn", f"bn{b}")]


def _copy_torch_into_flax(torch_model, shapes, name):
    """Flax variables (of the structure ``shapes``) holding ``torch_model``'s weights."""
    convs = [m for m in torch_model.modules() if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in torch_model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    params = {k: dict(v) for k, v in shapes["params"].items()}
    stats = {k: dict(v) for k, v in shapes["batch_stats"].items()}
    conv_names, norm_names = _forward_order(name)
    assert set(conv_names) | set(norm_names) == set(params) and set(norm_names) == set(stats)

    def array(t):
        return jnp.asarray(t.detach().numpy())

    for name, conv in zip(conv_names, convs, strict=True):
        kernel = array(conv.weight).transpose(2, 3, 1, 0)  # OIHW -> HWIO
        assert kernel.shape == params[name]["kernel"].shape, name
        params[name]["kernel"] = kernel
        if conv.bias is not None:
            params[name]["bias"] = array(conv.bias)
    for name, norm in zip(norm_names, norms, strict=True):
        params[name] = {"scale": array(norm.weight), "bias": array(norm.bias)}
        stats[name] = {"mean": array(norm.running_mean), "var": array(norm.running_var)}
    return {"params": params, "batch_stats": stats}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_same_function_as_the_torch_seed_on_the_same_weights(name):
    torch.manual_seed(0)
    width = [3 + i % 4 for i in range(BUILDERS[name])]
    torch_model = getattr(torch_models, name)(width=width).eval()
    with torch.no_grad():  # running statistics and affine values away from the identity
        for m in torch_model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    flax_model = getattr(flax_models, name)(width=width)
    images = torch.randn(2, 3, 32, 32)
    variables = _copy_torch_into_flax(torch_model, _shapes(flax_model), name)
    with torch.no_grad():
        expected = torch_model(images).numpy()
    got = flax_model.apply(variables, jnp.asarray(images.permute(0, 2, 3, 1).numpy()))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-4)


def test_clone_with_widths_defines_the_grown_model():
    model = flax_models.vgg16(width=8)
    grown = model.clone(widths=[9] + [8] * 12)
    assert grown.widths == (9,) + (8,) * 12 and model.widths == (8,) * 13
    assert _shapes(grown)["params"]["conv0"]["kernel"].shape == (3, 3, 3, 9)
    assert _shapes(grown)["params"]["conv1"]["kernel"].shape == (3, 3, 9, 8)
    assert hash(grown) is not None  # a tuple field: usable as a static jit argument


def test_names_give_the_producer_of_each_width():
    params = _shapes(flax_models.mobilenet_v1(width=list(range(1, 15))))["params"]
    for i in range(14):
        assert params[f"conv{i}"]["kernel"].shape[-1] == i + 1
    assert params["dw1"]["kernel"].shape == (3, 3, 1, 1)  # the stem's width, depthwise
    assert params["dw13"]["kernel"].shape == (3, 3, 1, 13)


@pytest.mark.parametrize("bad, error", [([16] * 12, ValueError), ([16] * 12 + [0], ValueError),
                                        ("16", TypeError), (16.5, TypeError)])
def test_bad_widths_are_refused_when_the_module_is_made(bad, error):
    with pytest.raises(error, match="widths"):
        flax_models.VGG16(widths=bad)


def test_bad_inputs_are_refused_with_the_fix():
    model = flax_models.vgg16(width=2)
    with pytest.raises(ValueError, match="not 1x1"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    with pytest.raises(ValueError, match="NHWC"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((32, 32, 3)))
    with pytest.raises(ValueError, match="activation"):
        flax_models.mobilenet_v1(activation="gelu")
