"""One ``simcore grow --framework jax`` run: the Flax seed trained with optax, grown, phased.

:func:`run_one` is the JAX twin of :func:`simcore.experiment.runner.run_one` and returns the
same result dictionary (``result.json``), so :mod:`.report`, :mod:`.statistics` and
:mod:`.figures` read both alike. What is the same, step for step:

* the data: the same batches as the PyTorch run of the same seed (:mod:`.data`'s pipeline,
  the same per-epoch generator, so the same order and augmentation), converted from NCHW
  to the NHWC the Flax seeds take (``x.permute(0, 2, 3, 1)``) and put on the JAX device;
* the model: :mod:`simcore.adapters.jax.models` (the same architecture and parameter count);
* the optimizer: SGD with momentum and PyTorch's coupled weight decay
  (``optax.add_decayed_weights`` then ``optax.trace``, the step scaled by the epoch's
  learning rate, cosine over the epochs as ``CosineAnnealingLR`` or constant);
* growth: the core grower of ``config.method`` through :func:`simcore.adapters.jax.grow`
  after the same epochs, scored on the same batches; the optimizer state grows with the
  parameters, and the jitted steps are rebuilt for the new widths (JAX is functional: the
  grown model is a new module definition);
* the phase: :class:`.array_phase.ArrayPhase` on the grown layers' kernels (the core's
  :func:`simcore.decorrelate`), weights-only or joint with relative steps;
* the measurements: accuracy per epoch, the Fig. 6 statistics of layer 2 (``conv1``), each
  growth's accuracy before/after and phase effect, the final similarity of every conv/dense
  kernel (depthwise excluded).

What a JAX run does not give: Grad-CAM (Fig. 4 is drawn from PyTorch checkpoints only) and
checkpoints: an interrupted JAX run starts over (a finished one is reused from its
``result.json``). The joint phase with absolute steps (Eq. 5 added to the loss) is refused.
Training time includes XLA's compilation of the training step, once per model size (at the
start and after each growth): every batch is padded to the batch size with a mask of its
real examples (the loss is their mean, BatchNorm's statistics are theirs), every array is
committed to the run's device, and the step is compiled ahead of time on its first call, so
a later call that would compile again fails instead. ``compile_seconds`` in the result is
the time those compilations took and ``compiles`` their number, so ``training_seconds -
compile_seconds`` compares with a PyTorch run's training time. This module imports no
PyTorch model, optimizer or growth code; the data pipeline is PyTorch's (CPU tensors), as
for the PyTorch run.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from simcore import growth as core

from .config import RunConfig
from .data import ImageDataset, iter_batches
from .jax_steps import CPU_COMPILER_OPTIONS, CompiledOnce, compiled_steps, cross_entropy
from .run_common import (
    CODE_CHANGED,
    NEW,
    RESULT,
    Hooks,
    RunState,
    begin_run,
    derive_seed,
    finished_status,
    growth_record,
    make_result,
    phase_layer_record,
    progress_bar,
    run_dataset,
    similarity_summary,
    weight_record,
    write_json,
)

__all__ = ["EVAL_BATCH", "STATS_LAYER", "resolve_device", "run_one",
           "run_status"]

#: Evaluation reads every split in batches of this many images, the last one padded, so that
#: the evaluation compiles once per model size whatever the splits' sizes.
EVAL_BATCH = 256
#: The layer whose similarity histogram the run records (the paper's Fig. 6: layer 2, i.e.
#: VGG16's second conv, MobileNetV1's first pointwise conv; both named ``conv1``).
STATS_LAYER = "conv1"


def resolve_device(name: str) -> Any:
    """The JAX device for ``name``: ``"auto"`` (JAX's default), ``"cpu"``, ``"cuda"``/``"gpu"``
    (``:index`` allowed)."""
    import jax

    if name == "auto":
        return jax.devices()[0]
    kind, _, index = name.partition(":")
    platform = {"cuda": "gpu", "gpu": "gpu", "cpu": "cpu", "tpu": "tpu"}.get(kind)
    if platform is None or (index and not index.isdigit()):
        raise ValueError(f"device {name!r} is not a JAX device name (cpu, cuda, cuda:1, auto)")
    try:
        devices = jax.devices(platform)
    except RuntimeError:
        raise ValueError(f"device {name!r} asked for, but JAX sees no {platform} device "
                         f"(use --device cpu)") from None
    number = int(index or 0)
    if number >= len(devices):
        raise ValueError(f"device {name!r}: JAX sees {len(devices)} {platform} device(s)")
    return devices[number]


def run_status(config: RunConfig, out_dir: str | Path, *,
               reuse_other_code: bool = False) -> tuple[str, int]:
    """``("reused", epochs)`` for a finished run with ``config``'s settings and this code;
    ``("code_changed", 0)`` for one that other code (or a version that recorded none) wrote,
    which :func:`run_one` sets aside and runs again, unless ``reuse_other_code`` (then
    ``("reused_other_code", epochs)``); else ``("new", 0)``. Changes nothing."""
    status = finished_status(config, Path(out_dir), reuse_other_code=reuse_other_code)
    if status is None:
        return NEW, 0  # nothing, other settings or an unreadable file: run_one says so
    return status, (0 if status == CODE_CHANGED else config.epochs)


def _build_model(config: RunConfig, num_classes: int):
    from simcore.adapters.jax.models import mobilenet_v1, vgg16

    if config.model == "vgg16":
        return vgg16(num_classes=num_classes, width=config.seed_width)
    return mobilenet_v1(num_classes=num_classes, width=config.seed_width, activation="swish")


def _make_grower(config: RunConfig, epoch: int) -> core.Grower:
    seed = derive_seed(config.seed, "growth", epoch)
    if config.method == "random":
        return core.RandomGrower(seed=seed)
    if config.method == "ssd":
        return core.SSDGrower(mode=config.ssd_mode, seed=seed)
    return core.FireflyGrower(seed=seed, new_per_layer=config.firefly_candidates)


def _learning_rate(config: RunConfig, epoch: int) -> float:
    """The epoch's learning rate, as PyTorch's ``CosineAnnealingLR(T_max=epochs)`` gives it."""
    if config.lr_schedule == "cosine":
        return config.lr * (1.0 + math.cos(math.pi * epoch / config.epochs)) / 2.0
    return config.lr


def _kernel_path(params: dict, layer: str) -> tuple[str, ...]:
    """The module path of ``layer`` in ``params`` (``"conv3"``, ``"params/conv3/kernel"``)."""
    parts = [p for p in layer.split("/") if p]
    parts = parts[1:] if parts[:1] == ["params"] else parts
    parts = parts[:-1] if parts[-1:] == ["kernel"] else parts
    node: Any = params
    for part in parts:
        if not isinstance(node, dict) or part not in node:
            raise ValueError(f"the grown layer {layer!r} has no kernel in the model's params")
        node = node[part]
    if not isinstance(node, dict) or "kernel" not in node:
        raise ValueError(f"the grown layer {layer!r} has no kernel in the model's params")
    return tuple(parts)


def _get(params: dict, path: tuple[str, ...]) -> Any:
    for part in path:
        params = params[part]
    return params["kernel"]


def _with_kernel(params: dict, path: tuple[str, ...], kernel: Any) -> dict:
    out = dict(params)
    out[path[0]] = (_with_kernel(params[path[0]], path[1:], kernel) if len(path) > 1
                    else {**params[path[0]], "kernel": kernel})
    return out


def _rows(kernel: Any) -> np.ndarray:
    """A Flax kernel (neurons on the last axis) as float64 rows, one per neuron."""
    array = np.asarray(kernel, dtype=np.float64)
    return array.reshape(-1, array.shape[-1]).T


def _similarity_layers(model) -> list[str]:
    """The conv/dense kernels the statistics cover (depthwise excluded), in forward order."""
    return [f"conv{i}" for i in range(len(model.widths))] + ["classifier"]


class _Run:
    """The mutable parts of one JAX run: model definition, variables, optimizer, steps."""

    def __init__(self, config: RunConfig, dataset: ImageDataset, device: Any):
        import jax
        import optax

        self.config, self.dataset, self.device = config, dataset, device
        self.tx = optax.chain(optax.add_decayed_weights(config.weight_decay),
                              optax.trace(decay=config.momentum))
        self.model = _build_model(config, dataset.num_classes)
        key = jax.random.key(derive_seed(config.seed, "init") & 0xFFFFFFFF)
        variables = jax.jit(self.model.init)(key, self.to_device(np.zeros((1, 32, 32, 3),
                                                                          np.float32)))
        self.params = self.to_device(variables["params"])
        self.batch_stats = self.to_device(variables["batch_stats"])
        self.opt_state = self.to_device(self.tx.init(self.params))
        self.train_steps: list[CompiledOnce] = []  # one per model size, compiled when first run
        self.build_steps()
        self._eval: dict[str, tuple[list, int]] = {}
        self._masks: dict[tuple[int, int], Any] = {}

    def build_steps(self) -> None:
        options = CPU_COMPILER_OPTIONS if self.device.platform == "cpu" else None
        self.train_step, self.count_correct = compiled_steps(self.model, self.tx, options)
        self.train_steps.append(self.train_step)

    def to_device(self, tree: Any) -> Any:
        """Arrays (NumPy or JAX, or a tree of them) committed to the run's device: every call
        of a compiled step then sees the same placement (a jitted function compiles again
        when an argument's placement changes)."""
        import jax

        return jax.device_put(tree, self.device)

    def batch(self, x, y) -> tuple[Any, Any]:
        """A pipeline batch (NCHW torch tensors) as NHWC images and labels on the device."""
        return self.to_device(x.permute(0, 2, 3, 1).numpy()), self.to_device(y.numpy())

    def padded_batch(self, x, y, size: int) -> tuple[Any, Any, Any]:
        """:meth:`batch` padded with zeros to ``size`` examples, and the mask of its real
        ones: one shape for every batch, so the steps compile once per model size."""
        count = int(y.shape[0])
        images, labels = x.permute(0, 2, 3, 1).numpy(), y.numpy()
        if count < size:
            images = np.concatenate([images, np.zeros((size - count, *images.shape[1:]),
                                                      images.dtype)])
            labels = np.concatenate([labels, np.zeros(size - count, labels.dtype)])
        if (count, size) not in self._masks:
            self._masks[count, size] = self.to_device(np.arange(size) < count)
        return self.to_device(images), self.to_device(labels), self._masks[count, size]

    @property
    def variables(self) -> dict[str, Any]:
        return {"params": self.params, "batch_stats": self.batch_stats}

    def parameters(self) -> int:
        from simcore.adapters.jax.models import parameter_count

        return parameter_count(self.variables)

    def evaluate(self, split: str = "test") -> float | None:
        if split not in self._eval:  # the evaluation batches never change: convert once
            pairs = list(iter_batches(self.dataset, split, EVAL_BATCH))
            self._eval[split] = ([self.padded_batch(x, y, EVAL_BATCH) for x, y in pairs],
                                 sum(int(y.shape[0]) for _, y in pairs))
        batches, count = self._eval[split]
        if count == 0:
            return None
        counts = [self.count_correct(self.variables, *batch) for batch in batches]
        return 100.0 * sum(int(c) for c in counts) / count

    def accuracies(self) -> dict[str, float | None]:
        return {"test": self.evaluate(), "val": self.evaluate("val")}

    def kernel_rows(self, layer: str) -> np.ndarray:
        return _rows(_get(self.params, _kernel_path(self.params, layer)))

    def stats(self, layer: str = STATS_LAYER) -> dict[str, Any]:
        return weight_record(self.kernel_rows(layer), layer)

    def kernels(self, layers: list[str]) -> list[np.ndarray]:
        """The kernels of ``layers`` as NumPy arrays (their dtype kept).

        The phase runs on the host: a few hundred small eager JAX operations per step cost
        seconds of dispatch where NumPy takes milliseconds, and a jitted phase would compile
        again after every growth (new shapes); the kernels are tiny next to a batch.
        """
        return [np.asarray(_get(self.params, _kernel_path(self.params, name)))
                for name in layers]

    def set_kernels(self, layers: list[str], kernels: list[Any]) -> None:
        for name, kernel in zip(layers, kernels, strict=True):
            self.params = _with_kernel(self.params, _kernel_path(self.params, name),
                                       self.to_device(kernel))

    def grow(self, epoch: int) -> Any:
        """Grow once with the configured method; the steps are rebuilt for the new widths."""
        from simcore.adapters.jax import grow

        config = self.config
        generator = _generator(derive_seed(config.seed, "growth_data", epoch))
        batches = []
        for x, y in iter_batches(self.dataset, "train", config.batch_size, generator=generator,
                                 augment=False):
            batches.append(self.batch(x, y))
            if len(batches) == config.growth_batches:
                break
        # the grower is seeded as the PyTorch run's is: the same draws where the maths is
        # deterministic (Random growth picks the same widths on both frameworks)
        grown = grow(_make_grower(config, epoch), self.model, self.variables, batches=batches,
                     loss_fn=cross_entropy, opt_state=self.opt_state, ratio=config.ratio,
                     unit=config.unit)
        self.model, self.opt_state = grown.model, self.to_device(grown.opt_state)
        self.params = self.to_device(grown.variables["params"])
        self.batch_stats = self.to_device(grown.variables["batch_stats"])
        self.build_steps()
        return grown.report


def _generator(seed: int):
    import torch  # the data pipeline's generator: the same batches as the PyTorch run

    return torch.Generator().manual_seed(seed)


def _phase(config: RunConfig):
    from .array_phase import ArrayPhase

    if config.terms == "none":
        return None
    rng = np.random.default_rng(derive_seed(config.seed, "control"))
    return ArrayPhase(config.terms, phase=config.phase, steps=config.phase_steps_or_default,
                      lr=config.phase_lr_or_default, lam=config.lam_or_default,
                      form=config.form, anchor=config.anchor, step=config.phase_step,
                      neuron_axis=-1, rng=rng if config.terms == "control" else None)


@contextlib.contextmanager
def _one_blas_thread():
    """NumPy's BLAS on one thread while the phase runs on the host: its matrices are tiny
    (neurons x fan-in), and on a busy CPU a BLAS pool's wake-ups cost more than they save
    (a grown VGG16's 20-step phase: 0.2-0.6 s on two threads, 0.07-0.1 s on one, with
    spikes of 4 s seen in runs). Without threadpoolctl, NumPy's own choice."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def _check_finite(value: float, config: RunConfig, epoch: int, batch: int) -> None:
    if not math.isfinite(value):
        raise FloatingPointError(
            f"{config.label}: the training loss became {value} in epoch {epoch + 1}, batch "
            f"{batch}; lower --lr or --phase-lr, then run again with --fresh")


def _grow(run: _Run, epoch: int, phase, state: RunState) -> tuple[dict[str, Any], list]:
    """One growth after ``epoch`` and its phase; returns its record and, for a joint phase
    that begins, the grown layers' rows as it found them (measured when it ends)."""
    accuracy: dict[str, Any] = {"before_growth": run.accuracies()}
    started = time.perf_counter()
    report = run.grow(epoch)
    grow_seconds = time.perf_counter() - started
    state.growth_seconds += grow_seconds
    accuracy["after_growth"] = run.accuracies()
    accuracy["after_phase"] = None
    state.similarity["after_growth"].append(run.stats())
    _check_weights(run, epoch)
    layers = ["/".join(_kernel_path(run.params, name)) for name in report.grown_layers]
    record = growth_record(epoch, report, grow_seconds, accuracy)
    if phase is None:
        return record, []
    started = time.perf_counter()
    before = [run.kernel_rows(name) for name in layers]
    record["phase"] = {"steps": run.config.phase_steps_or_default, "layers": {}}
    with _one_blas_thread():
        run.set_kernels(layers, phase.start(run.kernels(layers)))
    state.phase_layers = layers
    state.phase_remaining = phase.remaining
    seconds = time.perf_counter() - started
    record["phase_seconds"] = seconds
    state.phase_seconds += seconds
    if phase.active:
        return record, before
    _check_weights(run, epoch)
    _measure_phase(record, run, before, layers)
    state.similarity["after_phase"].append(run.stats())
    return record, []


def _check_weights(run: _Run, epoch: int) -> None:
    """Refuse to go on with weights a growth or its phase made non-finite."""
    import jax

    if all(bool(np.isfinite(np.asarray(leaf)).all())
           for leaf in jax.tree_util.tree_leaves(run.params)):
        return
    raise FloatingPointError(
        f"{run.config.label}: the weights became non-finite in the growth after epoch "
        f"{epoch + 1} or its similarity phase. Lower --phase-lr, then run again with --fresh")


def _measure_phase(record: dict[str, Any], run: _Run, before: list, layers: list[str]) -> None:
    for name, old in zip(layers, before, strict=True):
        record["phase"]["layers"][name] = phase_layer_record(old, run.kernel_rows(name), name)
    record["accuracy"]["after_phase"] = run.accuracies()


def run_one(config: RunConfig, out_dir: str | Path, *, dataset: ImageDataset | None = None,
            progress: bool = False, hooks: Hooks | None = None,
            resume: bool = True, reuse_other_code: bool = False) -> dict[str, Any]:
    """Run (or reuse the finished result of) one JAX configuration in ``out_dir``.

    Writes ``result.json`` (atomically) and returns the result dictionary. ``hooks`` are
    called as by the PyTorch runner; ``KeyboardInterrupt`` stops the run without a
    checkpoint (it starts over next time). A result of other code is set aside and the run
    starts again, unless ``reuse_other_code``, as in the PyTorch runner.
    """
    import jax

    from simcore.adapters.jax.models import widths

    if isinstance(config, RunConfig) and config.framework != "jax":
        raise ValueError(f"config.framework is {config.framework!r}: the JAX runner runs "
                         f"framework 'jax' configurations")
    hooks = hooks or Hooks()
    out, previous = begin_run(config, out_dir, resume=resume, reuse_other_code=reuse_other_code)
    if previous is not None:
        return previous
    device = resolve_device(config.device)
    dataset = run_dataset(config, dataset).to("cpu")
    from simcore.adapters.torch.schedule import GrowthSchedule  # plain Python, no torch model

    schedule = GrowthSchedule(every=config.grow_every, ratio=config.ratio, unit=config.unit,
                              max_growths=config.max_growths)
    with jax.default_device(device):
        run, state = _Run(config, dataset, device), RunState()
        state.similarity = {"layer": STATS_LAYER, "seed": run.stats(), "after_growth": [],
                            "after_phase": []}
        state.history.append({"epoch": 0, "test_accuracy": run.evaluate(),
                              "val_accuracy": run.evaluate("val"),
                              "parameters": run.parameters(), "train_loss": None,
                              "train_accuracy": None, "lr": config.lr})
        phase = _phase(config)
        phase_before: list = []
        batches_per_epoch = math.ceil(dataset.train_labels.shape[0] / config.batch_size)
        bar = progress_bar(config.epochs, 0, config.label, progress)
        for epoch in range(config.epochs):
            lr = float(_learning_rate(config, epoch))  # one argument type: one compile
            generator = _generator(derive_seed(config.seed, "epoch", epoch))
            inner = progress_bar(batches_per_epoch, 0, f"epoch {epoch + 1}",
                                 progress and batches_per_epoch > 50, leave=False)
            started = time.perf_counter()
            for x, y in iter_batches(dataset, "train", config.batch_size, generator=generator):
                images, labels, mask = run.padded_batch(x, y, config.batch_size)
                run.params, run.batch_stats, run.opt_state, loss, correct = run.train_step(
                    run.params, run.batch_stats, run.opt_state, images, labels, mask, lr)
                if phase is not None and phase.active:
                    phase_started = time.perf_counter()
                    layers = state.phase_layers
                    with _one_blas_thread():
                        run.set_kernels(layers, phase.after_optimizer_step(run.kernels(layers)))
                    state.phase_seconds += time.perf_counter() - phase_started
                    if not phase.active:  # the joint phase's last step: measure it
                        measuring = time.perf_counter()
                        _measure_phase(state.growths[-1], run, phase_before, layers)
                        phase_before = []
                        started += time.perf_counter() - measuring  # a report: not timed
                loss_value, correct = jax.device_get((loss, correct))  # waits for the step
                loss_value = float(loss_value)
                _check_finite(loss_value, config, epoch, state.batch + 1)
                state.loss_sum += loss_value * int(y.shape[0])
                state.correct += int(correct)
                state.seen += int(y.shape[0])
                state.batch += 1
                state.add_step_seconds(epoch, time.perf_counter() - started)
                started = time.perf_counter()
                inner.update(1)
                if hooks.on_batch_end is not None:
                    hooks.on_batch_end(epoch, state.batch)
            inner.close()
            record = state.epoch_record(epoch, _learning_rate(config, epoch + 1))
            if schedule.should_grow(epoch):
                timed = state.growth_seconds + state.phase_seconds
                growth, phase_before = _grow(run, epoch, phase, state)
                state.growths.append(growth)
                # the growth's own timers: its diagnostic evaluations are not training
                state.train_seconds += state.growth_seconds + state.phase_seconds - timed
            record["test_accuracy"] = run.evaluate()
            record["val_accuracy"] = run.evaluate("val")
            record["parameters"] = run.parameters()
            record["widths"] = widths(run.model)
            state.history.append(record)
            state.epoch, state.batch = epoch + 1, 0
            state.loss_sum, state.correct, state.seen = 0.0, 0, 0
            bar.update(1)
            bar.set_postfix(acc=f"{record['test_accuracy']:.1f}", params=record["parameters"])
            if hooks.on_epoch_end is not None:
                hooks.on_epoch_end(epoch, record)
        bar.close()
        state.similarity["final"] = run.stats()
        state.similarity["final_all"] = similarity_summary(
            {name: run.kernel_rows(name) for name in _similarity_layers(run.model)})
        result = make_result(config, config.training_key(), state, device=str(device),
                             parameters_final=run.parameters(), widths_final=widths(run.model))
    # the training step's lowering and XLA compilation, once per model size (training time)
    result["compile_seconds"] = sum(step.seconds for step in run.train_steps)
    result["compiles"] = sum(step.executable is not None for step in run.train_steps)
    write_json(out / RESULT, result)
    return result
