"""The JAX adapter's SSD statistics equal the PyTorch adapter's on the same net, weights and data.

The same small CNN (conv -> BatchNorm -> ReLU -> flatten -> linear) is built in PyTorch (NCHW,
OIHW) and in Flax linen (NHWC, HWIO) with the weights copied across the layout change; both
hosts capture SSD's statistics, and the splitting matrices built from them agree with each
other (rows reordered from Flax's (kh, kw, C_in) to PyTorch's (C_in, kh, kw)) and with the
independent NumPy reference (reference/ssd.py) on the captured inputs.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
nn = pytest.importorskip("flax.linen")
optax = pytest.importorskip("optax")

from simcore.adapters.jax._models import model_kind  # noqa: E402
from simcore.adapters.jax.grow import discover_flows as jax_flows  # noqa: E402
from simcore.adapters.jax.host import JaxGrowthHost  # noqa: E402
from simcore.adapters.torch.discovery import discover_flows as torch_flows  # noqa: E402
from simcore.adapters.torch.host import TorchGrowthHost  # noqa: E402
from simcore.reference import ssd as reference  # noqa: E402

from simcore.growth import splitting_matrices  # noqa: E402

C_IN, C, H, W, CLASSES, BATCH = 2, 3, 4, 4, 2, 6


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(C, (3, 3), padding=1)(x)
        x = nn.BatchNorm(use_running_average=not train, epsilon=1e-5)(x)
        x = nn.relu(x)
        return nn.Dense(CLASSES)(x.reshape((x.shape[0], -1)))


def _nets():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(C_IN, C, 3, padding=1), torch.nn.BatchNorm2d(C),
                              torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(C * H * W, CLASSES)).double()
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 1.5)
        net[1].bias.uniform_(-0.5, 0.5)
        net[1].running_mean.uniform_(-0.3, 0.3)
        net[1].running_var.uniform_(0.5, 2.0)
    net.eval()
    conv, bn, head = net[0], net[1], net[4]

    def a(t):
        return jax.numpy.asarray(t.detach().numpy())

    dense = head.weight.detach().numpy().reshape(CLASSES, C, H, W).transpose(2, 3, 1, 0)
    variables = {
        "params": {
            "Conv_0": {"kernel": a(conv.weight.permute(2, 3, 1, 0)), "bias": a(conv.bias)},
            "BatchNorm_0": {"scale": a(bn.weight), "bias": a(bn.bias)},
            "Dense_0": {"kernel": jax.numpy.asarray(dense.reshape(H * W * C, CLASSES)),
                        "bias": a(head.bias)},
        },
        "batch_stats": {"BatchNorm_0": {"mean": a(bn.running_mean), "var": a(bn.running_var)}},
    }
    return net, LinenNet(), variables


def test_ssd_statistics_and_splitting_matrices_equal_the_torch_adapters():
    jax.config.update("jax_enable_x64", True)  # compare in float64 (the torch net is double)
    net, model, variables = _nets()
    rng = np.random.default_rng(0)
    images = rng.standard_normal((BATCH, C_IN, H, W))
    labels = rng.integers(0, CLASSES, BATCH)
    torch_batch = (torch.from_numpy(images), torch.from_numpy(labels))
    jax_batch = (jax.numpy.asarray(images.transpose(0, 2, 3, 1)), jax.numpy.asarray(labels))

    outputs = model.apply(variables, jax_batch[0])
    np.testing.assert_allclose(np.asarray(outputs), net(torch_batch[0]).detach().numpy(),
                               rtol=1e-10, atol=1e-10)  # the weights were copied right

    torch_host = TorchGrowthHost(net, torch_flows(net, torch_batch[0][:1]))
    (t_stats,) = torch_host.splitting_statistics([torch_batch], torch.nn.functional.cross_entropy)
    kind = model_kind(model, variables)
    flows = jax_flows(model, variables, jax_batch[0])
    jax_host = JaxGrowthHost(kind, flows, jax_batch[0], host_arrays=True)

    def loss_fn(out, targets):
        return optax.softmax_cross_entropy_with_integer_labels(out, targets).mean()

    (j_stats,) = jax_host.splitting_statistics([jax_batch], loss_fn)
    assert (t_stats.activation, j_stats.activation) == ("relu", "relu")
    np.testing.assert_allclose(np.asarray(j_stats.bn_scale),
                               t_stats.bn_scale.numpy(), rtol=1e-10)
    (t_x, t_g, t_z), (j_x, j_g, j_z) = t_stats.batches[0], j_stats.batches[0]
    # torch rows: (sample, position); JAX rows: (sample, position) flattened with P = 1
    np.testing.assert_allclose(np.asarray(j_z).reshape(-1, C), t_z.numpy().reshape(-1, C),
                               rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.asarray(j_g).reshape(-1, C), t_g.numpy().reshape(-1, C),
                               rtol=1e-8, atol=1e-14)
    # Flax patch rows are ordered (kh, kw, C_in); torch's (C_in, kh, kw)
    order = np.arange(9 * C_IN).reshape(3, 3, C_IN).transpose(2, 0, 1).ravel()
    np.testing.assert_allclose(np.asarray(j_x).reshape(-1, 9 * C_IN)[:, order],
                               t_x.numpy().reshape(-1, 9 * C_IN), atol=1e-12)

    s_torch = splitting_matrices(*[t.numpy() for t in t_stats.batches[0]], activation="relu",
                                 bn_scale=t_stats.bn_scale.numpy())
    s_jax = splitting_matrices(*[np.asarray(a) for a in j_stats.batches[0]], activation="relu",
                               bn_scale=np.asarray(j_stats.bn_scale))
    s_jax = s_jax[:, order][:, :, order]
    np.testing.assert_allclose(s_jax, s_torch, rtol=1e-8, atol=1e-12)
    s_reference = reference.splitting_matrices(*[t.numpy() for t in t_stats.batches[0]],
                                               activation="relu",
                                               bn_scale=t_stats.bn_scale.numpy())
    np.testing.assert_allclose(s_jax, s_reference, rtol=1e-8, atol=1e-12)
    assert np.abs(s_reference).max() > 1e-6  # a non-trivial comparison
