"""``simcore grow --framework jax``: its optimizer, schedule, phase and configuration, and a run.

The pieces are checked against their PyTorch counterparts (SGD with momentum and weight
decay, CosineAnnealingLR, the torch phase's semantics); the end-to-end run (marked slow: XLA
compiles the steps again after every growth) writes ``results.json`` and learns.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import simcore

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
torch = pytest.importorskip("torch")
pytest.importorskip("flax")

from simcore.experiment import jax_runner, jax_steps  # noqa: E402
from simcore.experiment.array_phase import ArrayPhase  # noqa: E402
from simcore.experiment.config import RunConfig  # noqa: E402


def test_the_optax_chain_is_torchs_sgd_with_momentum_and_weight_decay():
    config = RunConfig(momentum=0.9, weight_decay=5e-4)
    run_tx = optax.chain(optax.add_decayed_weights(config.weight_decay),
                         optax.trace(decay=config.momentum))
    start = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    target = np.ones((4, 3), np.float32)

    weight = torch.tensor(start, requires_grad=True)
    sgd = torch.optim.SGD([weight], lr=0.1, momentum=0.9, weight_decay=5e-4)
    params = {"w": jax.numpy.asarray(start)}
    state = run_tx.init(params)
    grad = jax.grad(lambda p: ((p["w"] - target) ** 2).sum())
    for step in range(5):
        lr = 0.1 * (step + 1)  # the runner changes the rate between epochs: so here
        for group in sgd.param_groups:
            group["lr"] = lr
        sgd.zero_grad()
        ((weight - torch.tensor(target)) ** 2).sum().backward()
        sgd.step()
        updates, state = run_tx.update(grad(params), state, params)
        params = optax.apply_updates(params, jax.tree_util.tree_map(lambda u, r=lr: -r * u,
                                                                    updates))
    np.testing.assert_allclose(np.asarray(params["w"]), weight.detach().numpy(), rtol=1e-5)


def test_the_learning_rate_follows_torchs_cosine_schedule():
    config = RunConfig(epochs=7, lr=0.05)
    weight = torch.zeros(1, requires_grad=True)
    sgd = torch.optim.SGD([weight], lr=config.lr)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(sgd, T_max=config.epochs)
    for epoch in range(config.epochs):
        assert jax_runner._learning_rate(config, epoch) == pytest.approx(
            sgd.param_groups[0]["lr"], rel=1e-12, abs=1e-15)
        sgd.step()
        cosine.step()
    assert jax_runner._learning_rate(config.replace(lr_schedule="constant"), 5) == config.lr


def test_a_jax_run_has_its_own_label_and_a_torch_runs_key_is_unchanged():
    torch_config, jax_config = RunConfig(), RunConfig(framework="jax")
    assert jax_config.label == torch_config.label + "-jax"
    assert "framework" not in torch_config.training_key()  # results from before still match
    assert jax_config.training_key()["framework"] == "jax"
    with pytest.raises(ValueError, match="relative"):
        RunConfig(framework="jax", phase="joint", phase_step="absolute")
    with pytest.raises(ValueError, match="framework"):
        RunConfig(framework="mxnet")


def _correlated(shape, seed=0):
    """HWIO-like weights (neurons last) whose neurons share a common direction."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) + 2.0 * rng.standard_normal(shape[:-1])[..., None]
            ).astype(np.float32)


def test_the_weights_only_phase_is_the_cores_decorrelate_on_the_kernels():
    kernels = [_correlated((3, 3, 4, 6)), _correlated((12, 5), seed=1)]
    phase = ArrayPhase("both", steps=10, lr=0.05, lam=10.0)
    new = phase.start(kernels)
    expected = simcore.decorrelate(kernels, steps=10, lr=0.05, lam=10.0, neuron_axis=-1)
    for got, want, old in zip(new, expected, kernels, strict=True):
        np.testing.assert_array_equal(got, want)
        assert simcore.similarity_loss(got, neuron_axis=-1) < simcore.similarity_loss(
            old, neuron_axis=-1)
    assert not phase.active
    # Eq. 2 alone: lam 0 (the weights' scale then drifts); Eq. 4 alone: nothing to restrain
    eq2 = ArrayPhase("eq2", steps=10, lr=0.05, lam=10.0).start(kernels)
    np.testing.assert_array_equal(
        eq2[0], simcore.decorrelate(kernels, steps=10, lr=0.05, lam=0.0, neuron_axis=-1)[0])
    eq4 = ArrayPhase("eq4", steps=10, lr=0.05, lam=10.0).start(kernels)
    np.testing.assert_allclose(eq4[0], kernels[0], rtol=1e-6)


def test_a_joint_phase_takes_one_step_after_each_optimizer_step():
    kernels = [_correlated((3, 3, 4, 6))]
    phase = ArrayPhase("both", phase="joint", steps=2, lr=0.05, lam=10.0)
    assert phase.start(kernels)[0] is kernels[0] and phase.remaining == 2
    after_training = [kernels[0] * 1.01]
    one = phase.after_optimizer_step(after_training)
    expected = simcore.decorrelate(after_training, kernels, steps=1, lr=0.05, lam=10.0,
                                   neuron_axis=-1)
    np.testing.assert_array_equal(one[0], expected[0])
    phase.after_optimizer_step(one)
    assert not phase.active
    assert phase.after_optimizer_step(one)[0] is one[0]  # nothing due: unchanged


def test_the_control_moves_each_neuron_as_far_as_the_phase_in_another_direction():
    kernels = [_correlated((3, 3, 4, 6))]
    moved = ArrayPhase("both", steps=10, lr=0.05, lam=10.0).start(kernels)[0]
    control = ArrayPhase("control", steps=10, lr=0.05, lam=10.0,
                         rng=np.random.default_rng(0)).start(kernels)[0]

    def distances(new):
        return np.linalg.norm((new - kernels[0]).reshape(-1, 6), axis=0)

    np.testing.assert_allclose(distances(control), distances(moved), rtol=1e-4)
    assert not np.allclose(control, moved)
    with pytest.raises(ValueError, match="rng"):
        ArrayPhase("control", steps=10)


@pytest.mark.slow
def test_simcore_grow_with_jax_writes_results_and_learns(tmp_path):
    from simcore.experiment.cli import main

    out = tmp_path / "grow"
    status = main(["--framework", "jax", "--method", "random", "--epochs", "4",
                   "--grow-every", "2", "--max-growths", "1", "--train-limit", "600",
                   "--test-limit", "200", "--val-fraction", "0", "--seeds", "0",
                   "--similarity", "on", "--out", str(out), "--no-figures", "--quiet",
                   "--jobs", "1"])
    assert status == 0
    [result] = json.loads((out / "results.json").read_text())
    assert result["config"]["framework"] == "jax" and result["label"].endswith("-jax")
    assert result["final_accuracy"] > 50.0  # ten classes: chance is 10%
    [growth] = result["growths"]
    assert growth["params_after"] > growth["params_before"] == result["parameters_seed"]
    assert result["parameters_final"] == growth["params_after"]
    assert growth["phase"]["layers"]  # the phase ran on the grown layers and was measured
    assert sum(result["widths_final"]) == 13 * 16 + growth["budget"]
    assert (out / "table.txt").read_text().startswith("Method")
    assert main(["--framework", "jax", "--method", "random", "--epochs", "4",
                 "--grow-every", "2", "--max-growths", "1", "--train-limit", "600",
                 "--test-limit", "200", "--val-fraction", "0", "--seeds", "0",
                 "--similarity", "on", "--out", str(out), "--no-figures", "--quiet",
                 "--jobs", "1"]) == 0  # a finished run is reused, not trained again



@pytest.mark.slow
def test_each_runner_leaves_the_other_framework_unimported():
    import subprocess
    import sys

    # the package's __init__ imports the torch runner, so the JAX runner is re-executed with
    # the torch runner removed from sys.modules: an import of it would bring it back
    code = ("import importlib, sys\n"
            "import simcore.experiment.runner, simcore.experiment.compare\n"
            "assert 'jax' not in sys.modules, 'the torch runner imported jax'\n"
            "import simcore.experiment.jax_runner as jax_runner\n"
            "assert 'jax' not in sys.modules, 'importing the JAX runner imported jax'\n"
            "del sys.modules['simcore.experiment.runner']\n"
            "importlib.reload(jax_runner)\n"
            "assert 'simcore.experiment.runner' not in sys.modules, 'torch runner imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def _compile_counter():
    """A list that gains one entry per XLA compilation until the returned stop() is called."""
    compiles: list[str] = []

    def listener(event, _seconds, **_kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    return compiles, lambda: jax.monitoring.unregister_event_duration_listener(listener)


def test_a_padded_batch_trains_as_its_real_examples_and_the_step_compiles_once():
    from simcore.adapters.jax.models import vgg16

    model = vgg16(num_classes=10, width=4)
    tx = optax.chain(optax.add_decayed_weights(5e-4), optax.trace(decay=0.9))
    rng = np.random.default_rng(0)
    images = rng.standard_normal((8, 32, 32, 3)).astype(np.float32)
    labels = rng.integers(0, 10, 8).astype(np.int32)
    # Drawn values in the initialised shapes: compiling model.init would take as long as the
    # step itself, and BatchNorm's scale, shift and running statistics away from 1 and 0 check
    # more than the initial ones would.
    shapes = jax.eval_shape(model.init, jax.random.key(0), images[:1])
    variables = jax.tree_util.tree_map(
        lambda s: (rng.uniform(-1, 1, s.shape) / np.sqrt(np.prod(s.shape[:-1])) if len(s.shape) == 4
                   else rng.uniform(0.5, 1.5, s.shape)).astype(s.dtype), shapes)
    params, stats = variables["params"], variables["batch_stats"]
    state = tx.init(params)

    def unpadded_step(x, y):  # the plain mean over a batch of its own size
        def loss_of(p):
            logits, updates = model.apply({"params": p, "batch_stats": stats}, x, train=True,
                                          mutable=["batch_stats"])
            return jax_steps.cross_entropy(logits, y), updates["batch_stats"]

        (loss, new_stats), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
        updates, _ = tx.update(grads, state, params)
        return optax.apply_updates(params, jax.tree_util.tree_map(lambda u: -0.1 * u,
                                                                  updates)), new_stats, loss

    step, _ = jax_steps.compiled_steps(model, tx)
    compiles, stop = _compile_counter()
    try:
        real = 5  # an epoch's smaller last batch, padded to the batch size with zeros
        padded = np.concatenate([images[:real], np.zeros_like(images[real:])])
        mask = np.arange(8) < real
        new_params, new_stats, _, loss, correct = step(params, stats, state, padded,
                                                       labels * mask, mask, 0.1)
        full = step(params, stats, state, images, labels, np.ones(8, bool), 0.1)
        assert len(compiles) == 1  # the full batch ran on the same executable
        with pytest.raises(TypeError):  # another shape fails instead of compiling again
            step(params, stats, state, images[:real], labels[:real], mask[:real], 0.1)
    finally:
        stop()
    assert step.seconds > 0 and int(full[4]) <= 8
    want_params, want_stats, want_loss = jax.jit(unpadded_step)(images[:real], labels[:real])
    assert float(loss) == pytest.approx(float(want_loss), rel=1e-5)
    for got, want in zip(jax.tree_util.tree_leaves((new_params, new_stats)),
                         jax.tree_util.tree_leaves((want_params, want_stats)), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=2e-5)
    assert 0 <= int(correct) <= real


@pytest.mark.slow
def test_random_growth_of_the_jax_seed_compiles_no_program_per_array():
    from simcore.adapters.jax import grow
    from simcore.adapters.jax.models import vgg16

    # widths no other test uses: an eager operation on a new shape would compile here
    model = vgg16(num_classes=10, width=[3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27])
    x = jax.numpy.zeros((2, 32, 32, 3))
    variables = jax.jit(model.init)(jax.random.key(0), x)
    compiles, stop = _compile_counter()
    try:
        grown = grow(simcore.growth.RandomGrower(seed=11), model, variables,
                     batches=[(x, jax.numpy.zeros(2, dtype=int))], ratio=0.35)
    finally:
        stop()
    assert sum(grown.model.widths) > sum(model.widths)
    # before: one program per grown array (about 27 for VGG16's kernels and BatchNorms)
    assert len(compiles) <= 3, f"{len(compiles)} XLA compilations during one Random growth"
