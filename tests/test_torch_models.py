"""The paper's growth seeds: parameter counts, shapes, naming, widths and rebuilding."""

import pytest

torch = pytest.importorskip("torch")

from simcore.adapters.torch import (  # noqa: E402
    VGG16,
    MobileNetV1,
    architecture,
    build,
    mobilenet_v1,
    vgg16,
    widths,
)
from torch import nn  # noqa: E402


def _parameter_count(model):
    return sum(p.numel() for p in model.parameters())


def _vgg16_count(ws, classes=10, in_channels=3):
    """Parameters of VGG16 from its widths: 3x3 convs without bias, BN (2 per channel), head."""
    convs = sum(9 * c_in * c_out for c_in, c_out in zip([in_channels, *ws[:-1]], ws, strict=True))
    return convs + 2 * sum(ws) + ws[-1] * classes + classes


def _mobilenet_count(ws, classes=10, in_channels=3):
    stem = 9 * in_channels * ws[0] + 2 * ws[0]
    blocks = sum(9 * c_in + 2 * c_in + c_in * c_out + 2 * c_out
                 for c_in, c_out in zip(ws[:-1], ws[1:], strict=True))
    return stem + blocks + ws[-1] * classes + classes


def test_paper_seed_parameter_counts():
    assert _parameter_count(vgg16()) == 28_666  # the paper's 0.0288M
    assert _parameter_count(mobilenet_v1()) == 19_978
    assert _parameter_count(mobilenet_v1(activation="relu")) == 19_978


def test_any_width_counts_follow_the_formula():
    ws = [16, 21, 30, 18, 40, 16, 16, 25, 33, 16, 17, 16, 19]
    assert _parameter_count(vgg16(num_classes=100, width=ws)) == _vgg16_count(ws, 100)
    mws = [32, 40, 32, 55, 32, 32, 61, 32, 32, 32, 44, 32, 32, 70]
    assert _parameter_count(mobilenet_v1(width=mws)) == _mobilenet_count(mws)
    assert _parameter_count(vgg16(width=8, in_channels=1)) == _vgg16_count([8] * 13, 10, 1)


def test_outputs_logits_and_reaches_a_one_by_one_map():
    torch.manual_seed(0)
    x = torch.randn(3, 3, 32, 32)
    model = vgg16(width=4).eval()
    assert model(x).shape == (3, 10)
    assert model.features(x).shape == (3, 4, 1, 1)
    net = mobilenet_v1(width=4, num_classes=7).eval()
    assert net(x).shape == (3, 7)
    assert net.features(x).shape == (3, 4, 2, 2)  # strides 2 at blocks 2, 4, 6, 12
    with pytest.raises(RuntimeError):
        model(torch.randn(1, 3, 64, 64))  # not 32x32: a 2x2 map, no silent extra logits


def test_module_naming_is_regular():
    model = vgg16()
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert convs == [f"features.{i}" for i in (0, 3, 7, 10, 14, 17, 20, 24, 27, 30, 34, 37, 40)] + [
        "classifier"
    ]
    for name in convs[:-1]:
        i = int(name.split(".")[1])
        assert isinstance(model.features[i + 1], nn.BatchNorm2d)
        assert isinstance(model.features[i + 2], nn.ReLU)
        assert model.features[i].bias is None
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.features) == 5
    net = mobilenet_v1()
    for b in range(13):
        dw, pw = net.features[3 + 6 * b], net.features[6 + 6 * b]
        assert dw.groups == dw.in_channels == dw.out_channels and dw.kernel_size == (3, 3)
        assert pw.groups == 1 and pw.kernel_size == (1, 1)
        assert isinstance(net.features[5 + 6 * b], nn.SiLU)
    strides = [net.features[3 + 6 * b].stride[0] for b in range(13)]
    assert [b + 1 for b, s in enumerate(strides) if s == 2] == [2, 4, 6, 12]
    assert net.classifier.bias is not None and net.classifier.kernel_size == (1, 1)


def test_models_trace_with_torch_fx():
    for model in (vgg16(width=4), mobilenet_v1(width=4)):
        traced = torch.fx.symbolic_trace(model)
        x = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(traced.eval()(x), model.eval()(x))


def test_widths_architecture_and_build_round_trip():
    ws = [16, 21, 30, 18, 40, 16, 16, 25, 33, 16, 17, 16, 19]
    model = vgg16(num_classes=5, width=ws)
    assert widths(model) == ws
    description = architecture(model)
    assert description == {"builder": "vgg16",
                           "kwargs": {"num_classes": 5, "width": ws, "in_channels": 3}}
    rebuilt = build(description)
    assert isinstance(rebuilt, VGG16)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }
    mws = [8, 9, 8, 10, 8, 8, 11, 8, 8, 8, 12, 8, 8, 13]
    net = mobilenet_v1(width=mws, activation="relu")
    again = build(architecture(net))
    assert isinstance(again, MobileNetV1) and widths(again) == mws
    assert again.activation == "relu"


def test_widths_follow_a_model_grown_in_place():
    model = vgg16(width=4)
    model.features[3] = nn.Conv2d(4, 6, 3, padding=1, bias=False)
    assert widths(model)[1] == 6


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="13 entries"):
        vgg16(width=[16] * 12)
    with pytest.raises(ValueError, match="14 entries"):
        mobilenet_v1(width=[32] * 13)
    with pytest.raises(ValueError, match=r"width\[2\]"):
        vgg16(width=[16, 16, 0] + [16] * 10)
    with pytest.raises(TypeError, match="width"):
        vgg16(width=16.0)
    with pytest.raises(TypeError, match="num_classes"):
        vgg16(num_classes="10")
    with pytest.raises(ValueError, match="activation"):
        mobilenet_v1(activation="gelu")
    with pytest.raises(TypeError, match="model"):
        widths(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="builder"):
        build({"builder": "resnet18", "kwargs": {}})


def test_width_one_layers_round_trip():
    # A width-1 layer's depthwise conv has groups == 1 like a pointwise one; widths() must
    # still report exactly the stem and the 13 pointwise widths.
    mws = [1] + [4] * 13
    net = mobilenet_v1(width=mws)
    assert widths(net) == mws
    again = build(architecture(net))
    assert widths(again) == mws
    assert {k: v.shape for k, v in again.state_dict().items()} == {
        k: v.shape for k, v in net.state_dict().items()
    }
    ones = [3, 1, 5, 1] + [2] * 9 + [1]
    assert widths(build(architecture(mobilenet_v1(width=ones)))) == ones
    assert widths(vgg16(width=[1] * 13)) == [1] * 13
