"""One ``simcore grow`` run: train, grow on schedule, run the similarity phase, checkpoint, report.

:func:`run_one` trains the paper's growth seed (VGG16 or MobileNetV1) on a
dataset, grows it with Random, SSD or Firefly after the epochs the
:class:`~simcore.adapters.torch.schedule.GrowthSchedule` names, runs the
post-growth phase chosen by ``terms`` and returns a JSON-ready result:
accuracy per epoch (test and, when the dataset holds one, validation),
parameters per epoch, training time, and for every growth the accuracy just
before it, just after it and just after its phase, and, for every grown layer,
the Fig. 6 similarity statistics before and after the phase, the phase's
relative weight change and the drift of the layer's weight scale; at the end,
the similarity of every conv/linear layer.

Determinism and resumption: every random choice is drawn from a generator
seeded by (seed, what, epoch): the data order and augmentation of each epoch,
the growth of each growth epoch, the initial weights. So a run is reproducible
on CPU, and a run resumed from a checkpoint replays exactly what an
uninterrupted one does. A checkpoint (part 1's :func:`save_checkpoint`) is
written at the end of every epoch; Ctrl-C (SIGINT) is deferred to the end of
the current batch, where the state is consistent, a mid-epoch checkpoint is
written and ``KeyboardInterrupt`` is raised; calling :func:`run_one` again
with the same settings and folder resumes from it. A crash leaves the last
end-of-epoch checkpoint.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from simcore.adapters.torch import (
    FireflyGrower,
    GrowthSchedule,
    RandomGrower,
    SSDGrower,
    layer_weight,
    load_checkpoint,
    mobilenet_v1,
    parameter_count,
    save_checkpoint,
    vgg16,
    widths,
)

from .config import RunConfig
from .data import ImageDataset, iter_batches
from .fingerprint import code_fingerprint
from .measure import (
    accuracies,
    evaluate,
    final_similarity,
    growth_line,
    layer_name,
    layer_stats,
    measure_phase,
    similarity_layers,
)
from .run_common import (
    CODE_CHANGED,
    NEW,
    RESULT,
    RESUMED_OTHER_CODE,
    Hooks,
    RunInterrupted,
    begin_run,
    code_status,
    derive_seed,
    finished_status,
    growth_record,
    make_result,
    progress_bar,
    raise_mismatch,
    run_dataset,
    saved_code,
    set_aside,
    write_json,
)
from .run_common import RunState as _State
from .terms import make_phase

__all__ = ["Hooks", "RunInterrupted", "growth_line", "layer_name", "resolve_device", "run_one",
           "run_status", "similarity_layers"]

CHECKPOINT = "checkpoint.pt"


def resolve_device(name: str) -> torch.device:
    """``"auto"``: CUDA when available, else CPU; otherwise ``torch.device(name)`` (checked)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"device {name!r} is not a torch device: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but torch sees no CUDA GPU "
                         f"(use --device cpu)")
    return device


def _build_model(config: RunConfig, num_classes: int, width=None) -> nn.Module:
    width = config.seed_width if width is None else width
    if config.model == "vgg16":
        return vgg16(num_classes=num_classes, width=width)
    return mobilenet_v1(num_classes=num_classes, width=width, activation="swish")


def _make_grower(config: RunConfig, epoch: int):
    seed = derive_seed(config.seed, "growth", epoch)
    if config.method == "random":
        return RandomGrower(seed=seed)
    if config.method == "ssd":
        return SSDGrower(mode=config.ssd_mode, seed=seed)
    return FireflyGrower(seed=seed, new_per_layer=config.firefly_candidates)


def _make_scheduler(config: RunConfig, optimizer: torch.optim.Optimizer):
    if config.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _epoch: 1.0)


class _DeferredSigint:
    """Turn Ctrl-C into a flag read at the next consistent point (main thread only)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            def handler(signum, frame):
                if self.requested:  # a second Ctrl-C: stop at once (last checkpoint kept)
                    raise KeyboardInterrupt
                self.requested = True
                print("\nCtrl-C: stopping after this batch and writing a checkpoint "
                      "(press again to stop at once)", file=sys.stderr)
            self._previous = signal.signal(signal.SIGINT, handler)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


def run_status(config: RunConfig, out_dir: str | Path, *,
               reuse_other_code: bool = False) -> tuple[str, int]:
    """What :func:`run_one` will do in ``out_dir``, and after how many epochs it starts.

    ``("reused", epochs)`` for a finished run with the same settings and code, ``("resumed",
    epoch)`` for a checkpoint of them after ``epoch`` finished epochs; ``("code_changed", 0)``
    when the files hold the same settings but were written by other code (or before the code
    was recorded): the run starts again and they are set aside, unless ``reuse_other_code``
    (then ``"reused_other_code"`` or ``"resumed_other_code"``); else ``("new", 0)`` (also when
    the files hold other settings: run_one says so). Changes nothing.
    """
    out = Path(out_dir)
    status = finished_status(config, out, reuse_other_code=reuse_other_code)
    if status is not None:
        return status, (0 if status == CODE_CHANGED else config.epochs)
    if (out / RESULT).exists():
        return NEW, 0  # other settings or unreadable: run_one refuses it with the way out
    try:
        extra = _saved_extra(out / CHECKPOINT)
    except ValueError:
        return NEW, 0  # unreadable: run_one reports it with the way out
    if extra is None or extra.get("key") != config.training_key():
        return NEW, 0
    status = code_status(extra, finished=False, reuse_other_code=reuse_other_code)
    return status, (0 if status == CODE_CHANGED else int(extra["state"]["epoch"]))


def _saved_extra(path: Path) -> dict[str, Any] | None:
    """The ``extra`` of the checkpoint at ``path`` (its settings, code and run state), read
    without building the model; ``None`` when there is no checkpoint."""
    if not path.exists():
        return None
    try:
        extra = torch.load(path, map_location="cpu", weights_only=True)["extra"]
    except (OSError, RuntimeError, ValueError, KeyError, TypeError, EOFError) as err:
        raise ValueError(f"cannot read checkpoint {path} ({err}); delete it or pass --fresh "
                         f"to start over") from None
    return extra if isinstance(extra, dict) else {}


def _other_code_resumed(path: Path, key: dict[str, Any], reuse_other_code: bool) -> list[str]:
    """The fingerprints of other code that trained part of the run the checkpoint at ``path``
    resumes (usually none). A checkpoint of ``key``'s settings that other code wrote is set
    aside, so that the run starts again, unless ``reuse_other_code``."""
    saved = _saved_extra(path)
    if saved is None or saved.get("key") != key:  # none, or other settings: _restore refuses
        return []
    status = code_status(saved, finished=False, reuse_other_code=reuse_other_code)
    if status == CODE_CHANGED:
        set_aside(path, saved)
        return []
    earlier = [str(code) for code in saved.get("resumed_from_code", [])]
    other = saved_code(saved) or "unknown"
    if status == RESUMED_OTHER_CODE and other not in earlier:
        earlier.append(other)
    return earlier


def run_one(config: RunConfig, out_dir: str | Path, *, dataset: ImageDataset | None = None,
            progress: bool = False, hooks: Hooks | None = None,
            resume: bool = True, reuse_other_code: bool = False) -> dict[str, Any]:
    """Run (or resume, or reuse the finished result of) one configuration in ``out_dir``.

    ``out_dir`` receives ``checkpoint.pt`` (kept at the end: the grown model,
    used for Grad-CAM) and ``result.json``. With ``resume=False`` any previous
    state in ``out_dir`` is ignored and overwritten (a finished ``result.json``
    is removed at once, so an interrupted fresh run leaves no stale result).
    A result or checkpoint of the same settings written by other code (its ``code``
    fingerprint differs, or it has none) is not reused: it is renamed
    ``result.code-<fingerprint>.json`` / ``checkpoint.code-<fingerprint>.pt`` and the run
    starts again, unless ``reuse_other_code`` (then it is reused or resumed as if this code
    had written it; a resumed run's result lists the other code in ``resumed_from_code``).
    ``dataset`` skips loading (compare mode shares one). Returns the result
    dictionary, also written to ``result.json`` atomically.
    """
    hooks = hooks or Hooks()
    out, previous = begin_run(config, out_dir, resume=resume, reuse_other_code=reuse_other_code)
    if previous is not None:
        return previous
    result_path, ckpt_path = out / RESULT, out / CHECKPOINT
    key = config.training_key()
    resumed_from_code = _other_code_resumed(ckpt_path, key, reuse_other_code) if resume else []
    device = resolve_device(config.device)
    dataset = run_dataset(config, dataset).to(device)
    schedule = GrowthSchedule(every=config.grow_every, ratio=config.ratio, unit=config.unit,
                              max_growths=config.max_growths)
    torch.manual_seed(derive_seed(config.seed, "init"))
    model = _build_model(config, dataset.num_classes).to(device)
    state, extra = _State(), {}
    stats_layer = layer_name(model, 2)
    if resume and ckpt_path.exists():
        model, optimizer, scheduler, state, extra = _restore(ckpt_path, config, key, device)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                    weight_decay=config.weight_decay)
        scheduler = _make_scheduler(config, optimizer)
        state.similarity = {"layer": stats_layer, "seed": layer_stats(model, stats_layer),
                            "after_growth": [], "after_phase": []}
        state.history.append({"epoch": 0, "test_accuracy": evaluate(model, dataset),
                              "val_accuracy": evaluate(model, dataset, split="val"),
                              "parameters": parameter_count(model), "train_loss": None,
                              "train_accuracy": None, "lr": config.lr})
    phase = _phase(config)
    phase_before: list[torch.Tensor] = []   # grown weights when a joint phase began
    if phase is not None and state.phase_remaining:
        _resume_joint_phase(phase, model, state, extra.get("phase_refs"))
        phase_before = [t.to(device) for t in extra["phase_before"]]

    loss_fn = nn.CrossEntropyLoss()
    batches_per_epoch = math.ceil(dataset.train_labels.shape[0] / config.batch_size)
    bar = progress_bar(config.epochs, state.epoch, config.label, progress)
    consistent = True   # the run's state can be checkpointed as it stands
    unsaved = False     # it changed since the last checkpoint

    def save() -> None:
        nonlocal unsaved
        extra: dict[str, Any] = {"key": key, "code": code_fingerprint(),
                                 "resumed_from_code": resumed_from_code,
                                 "state": state.to_extra()}
        if phase is not None and phase.active:
            extra["phase_refs"] = [r.detach().cpu() for r in phase.penalty.refs]
            extra["phase_before"] = [w.detach().cpu() for w in phase_before]
        # written to a temporary name and renamed: an interrupted save keeps the last one
        save_checkpoint(ckpt_path, model, optimizer, scheduler, extra=extra)
        unsaved = False

    try:
        with _DeferredSigint() as sigint:
            while state.epoch < config.epochs:
                epoch = state.epoch
                generator = torch.Generator().manual_seed(derive_seed(config.seed, "epoch", epoch))
                model.train()
                started = time.perf_counter()
                inner = progress_bar(batches_per_epoch, state.batch, f"epoch {epoch + 1}",
                                  progress and batches_per_epoch > 50, leave=False)
                for x, y in iter_batches(dataset, "train", config.batch_size,
                                         generator=generator, skip=state.batch):
                    consistent, unsaved = False, True
                    logits = model(x)
                    loss = loss_fn(logits, y)
                    joint = phase is not None and phase.active
                    total = loss + phase.term() if joint and phase.coupled else loss
                    optimizer.zero_grad(set_to_none=True)
                    total.backward()
                    optimizer.step()
                    if joint:
                        phase_started = time.perf_counter()
                        if not phase.coupled:
                            phase.after_optimizer_step()
                        state.phase_seconds += time.perf_counter() - phase_started
                        if not phase.active:  # the joint phase's last step: measure it
                            measuring = time.perf_counter()
                            measure_phase(state.growths[-1], model, dataset, phase_before,
                                           state.phase_layers)
                            phase_before = []
                            started += time.perf_counter() - measuring  # a report: not timed
                    loss_value = float(loss.detach())
                    if not math.isfinite(loss_value):
                        # raised before anything is saved: the last checkpoint stays the last
                        # good one (an exception other than Ctrl-C writes no checkpoint)
                        raise FloatingPointError(
                            f"{config.label}: the training loss became {loss_value} in epoch "
                            f"{epoch + 1}, batch {state.batch + 1}; the checkpoint of the last "
                            f"completed epoch is kept. Lower --lr or --phase-lr, then run "
                            f"again with --fresh")
                    state.loss_sum += loss_value * y.shape[0]
                    state.correct += int((logits.argmax(dim=1) == y).sum())
                    state.seen += int(y.shape[0])
                    state.batch += 1
                    state.phase_remaining = phase.remaining if phase is not None else 0
                    state.add_step_seconds(epoch, time.perf_counter() - started)
                    started = time.perf_counter()
                    consistent = True
                    inner.update(1)
                    if hooks.on_batch_end is not None:
                        hooks.on_batch_end(epoch, state.batch)
                    if sigint.requested:
                        raise RunInterrupted(f"interrupted in epoch {epoch + 1}")
                inner.close()

                # the end-of-epoch block changes several things together
                consistent, unsaved = False, True
                scheduler.step()
                record = state.epoch_record(epoch, optimizer.param_groups[0]["lr"])
                latest = None  # the model's accuracies if the growth just measured them
                if schedule.should_grow(epoch):
                    timed = state.growth_seconds + state.phase_seconds
                    record_, phase_before = _grow(config, epoch, model, optimizer, dataset,
                                                  loss_fn, phase, state, stats_layer)
                    state.growths.append(record_)
                    # the growth's own timers: its diagnostic evaluations are not training
                    state.train_seconds += state.growth_seconds + state.phase_seconds - timed
                    _check_finite(model, config, f"in the growth after epoch {epoch + 1} or "
                                  "its similarity phase")
                    latest = _last_accuracies(record_, phase)
                if latest is None:
                    latest = accuracies(model, dataset)
                record["test_accuracy"], record["val_accuracy"] = latest["test"], latest["val"]
                record["parameters"] = parameter_count(model)
                record["widths"] = widths(model)
                state.history.append(record)
                state.epoch, state.batch = epoch + 1, 0
                state.loss_sum, state.correct, state.seen = 0.0, 0, 0
                if state.epoch == config.epochs:
                    state.similarity["final"] = layer_stats(model, stats_layer)
                    state.similarity["final_all"] = final_similarity(model)
                _check_finite(model, config, f"in epoch {epoch + 1}")  # never checkpointed
                save()
                consistent = True
                bar.update(1)
                bar.set_postfix(acc=f"{record['test_accuracy']:.1f}",
                                params=record["parameters"])
                if hooks.on_epoch_end is not None:
                    hooks.on_epoch_end(epoch, record)
                if sigint.requested:
                    raise RunInterrupted(f"interrupted after epoch {epoch + 1}")
    except KeyboardInterrupt:
        if consistent and unsaved:  # an interrupt right after the epoch's save: nothing new
            save()
        bar.close()
        raise
    bar.close()
    result = make_result(config, key, state, device=str(device),
                         parameters_final=parameter_count(model), widths_final=widths(model),
                         resumed_from_code=resumed_from_code)
    write_json(result_path, result)
    return result


def _check_finite(model: nn.Module, config: RunConfig, when: str) -> None:
    """Refuse to go on (and to checkpoint) with weights or buffers that became non-finite.

    Buffers too: a joint phase with a huge absolute step can leave every loss finite
    (BatchNorm normalises the batch in training) while the running variances overflow.
    """
    named = [*model.named_parameters(), *model.named_buffers()]
    broken = [name for name, t in named
              if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if not broken:
        return
    more = f" and {len(broken) - 1} more" if len(broken) > 1 else ""
    raise FloatingPointError(
        f"{config.label}: {broken[0]}{more} became non-finite {when}; the checkpoint of the "
        f"last completed epoch is kept. Lower --lr or --phase-lr (or use --phase-step "
        f"relative), then run again with --fresh")


def _phase(config: RunConfig):
    generator = None
    if config.terms == "control":
        generator = torch.Generator().manual_seed(derive_seed(config.seed, "control"))
    return make_phase(config.terms, method=config.method, phase=config.phase,
                      steps=config.phase_steps_or_default, lam=config.lam_or_default,
                      lr=config.phase_lr_or_default, form=config.form, anchor=config.anchor,
                      step=config.phase_step, generator=generator)


def _last_accuracies(record, phase):
    """The accuracies the growth measured last, if the model has not changed since."""
    accuracy = record["accuracy"]
    if accuracy["after_phase"] is not None:
        return accuracy["after_phase"]
    return accuracy["after_growth"] if phase is None else None  # a joint phase: not yet run


def _grow(config, epoch, model, optimizer, dataset, loss_fn, phase, state, stats_layer):
    """One growth after ``epoch`` and its similarity phase.

    Returns the growth's record and, when a joint phase begins, the grown
    weights as it found them (its effect is measured when it ends).
    """
    data_gen = torch.Generator().manual_seed(derive_seed(config.seed, "growth_data", epoch))
    batches = []
    for batch in iter_batches(dataset, "train", config.batch_size, generator=data_gen,
                              augment=False):
        batches.append(batch)
        if len(batches) == config.growth_batches:
            break
    accuracy: dict[str, dict[str, float | None] | None] = {
        "before_growth": accuracies(model, dataset)}
    torch.manual_seed(derive_seed(config.seed, "growth", epoch))  # any use of the global RNG
    started = time.perf_counter()
    report = _make_grower(config, epoch).grow(model, batches, loss_fn, optimizer,
                                              ratio=config.ratio, unit=config.unit)
    grow_seconds = time.perf_counter() - started
    state.growth_seconds += grow_seconds
    accuracy["after_growth"] = accuracies(model, dataset)
    accuracy["after_phase"] = None
    state.similarity["after_growth"].append(layer_stats(model, stats_layer))
    record = growth_record(epoch, report, grow_seconds, accuracy)
    if phase is None:
        return record, []
    started = time.perf_counter()
    measured = set(similarity_layers(model))
    layers = [name for name in report.grown_layers if name in measured]
    before = [layer_weight(model, name).detach().clone() for name in layers]
    record["phase"] = {"steps": config.phase_steps_or_default, "layers": {}}
    phase.start(model, report.grown_layers)
    state.phase_layers = list(report.grown_layers)
    state.phase_remaining = phase.remaining
    seconds = time.perf_counter() - started
    record["phase_seconds"] = seconds
    state.phase_seconds += seconds
    if phase.active:  # joint: the phase runs during the next training steps
        return record, before
    measure_phase(record, model, dataset, before, layers)
    state.similarity["after_phase"].append(layer_stats(model, stats_layer))
    return record, []


def _resume_joint_phase(phase, model, state, refs):
    """Rebuild a joint phase that was running when the checkpoint was written."""
    joint = phase.phase
    phase.phase = "joint"  # start() must not run the weights-only steps again
    phase.start(model, state.phase_layers)
    phase.phase = joint
    phase.remaining = state.phase_remaining
    if refs is not None:
        phase.penalty.refs = refs


def _load(path: Path, **kwargs):
    try:
        return load_checkpoint(path, **kwargs)
    except (OSError, RuntimeError, ValueError, KeyError, EOFError) as err:
        # a truncated or foreign file: say which, and how to recover
        raise ValueError(f"cannot read checkpoint {path} ({err}); delete it or pass --fresh "
                         f"to start over") from None


def load_model(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The model stored in a run's checkpoint (e.g. the final grown model), in eval mode."""
    return _load(Path(path), device=device, restore_rng=False).model.eval()


def _restore(path, config, key, device):
    def optimizer_factory(params):
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay)

    saved = _load(path, optimizer=optimizer_factory,
                  scheduler=lambda opt: _make_scheduler(config, opt), device=device)
    extra = saved.extra
    if not isinstance(extra, dict) or extra.get("key") != key:
        raise_mismatch(path.parent, extra.get("key", {}) if isinstance(extra, dict) else {}, key)
    return saved.model, saved.optimizer, saved.scheduler, _State(**extra["state"]), extra
