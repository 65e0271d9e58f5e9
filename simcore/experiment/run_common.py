"""What the PyTorch and the JAX runner of ``simcore grow`` share, written without a framework.

The seeds of every random stream (:func:`derive_seed`), the state a run carries from epoch to
epoch (:class:`RunState`), the run's JSON files, whether an earlier run in its folder is
reused, resumed or run again (:func:`code_status`: same settings and same code), the
similarity records of a layer (:func:`weight_record`, :func:`phase_layer_record`,
:func:`similarity_summary`: NumPy float64 arrays with neurons on axis 0, whatever layout the
framework keeps them in) and the result dictionary (:func:`make_result`) that :mod:`.report`,
:mod:`.statistics` and :mod:`.figures` read. :mod:`.runner` (PyTorch) and :mod:`.jax_runner`
(JAX) import this module and never each other.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import simcore

from .config import RunConfig
from .files import write_atomic
from .fingerprint import FINGERPRINT_LENGTH, code_fingerprint

__all__ = ["CODE_CHANGED", "NEW", "RESULT", "RESUMED", "RESUMED_OTHER_CODE", "REUSED",
           "REUSED_OTHER_CODE", "Hooks", "RunInterrupted", "RunState", "begin_run",
           "code_status", "derive_seed", "finished_result", "finished_status", "growth_record",
           "make_result", "phase_layer_record", "progress_bar", "raise_mismatch", "read_json",
           "run_dataset", "saved_code", "set_aside", "similarity_summary", "weight_record",
           "write_json"]

RESULT = "result.json"

# What a run folder holds for a run, as ``run_status`` of either runner reports it:
NEW = "new"                                   # nothing of these settings: trained from the start
REUSED = "reused"                             # finished by this code: its result is reused
RESUMED = "resumed"                           # a checkpoint of this code: training resumes
CODE_CHANGED = "code_changed"                 # finished or begun by other code: run again
REUSED_OTHER_CODE = "reused_other_code"       # finished by other code, reused as asked
RESUMED_OTHER_CODE = "resumed_other_code"     # begun by other code, resumed as asked
_FINGERPRINT = re.compile(f"[0-9a-f]{{{FINGERPRINT_LENGTH}}}")
_STREAMS = {"init": 1, "epoch": 2, "growth": 3, "growth_data": 4, "control": 5}


class RunInterrupted(KeyboardInterrupt):
    """Raised after a checkpoint was written on Ctrl-C; re-run the same command to resume."""


@dataclass
class Hooks:
    """Callbacks: ``on_batch_end(epoch, batch)`` and ``on_epoch_end(epoch, record)``.

    Both run at consistent points: raising ``KeyboardInterrupt`` from one
    writes a checkpoint of that point and stops the run, as Ctrl-C does.
    """

    on_batch_end: Callable[[int, int], None] | None = None
    on_epoch_end: Callable[[int, dict], None] | None = None


def derive_seed(seed: int, stream: str, index: int = 0) -> int:
    """An independent 63-bit seed for ``stream`` (e.g. "epoch") number ``index`` of run ``seed``."""
    state = np.random.SeedSequence([int(seed), _STREAMS[stream], int(index)]).generate_state(2)
    return int((int(state[0]) << 31) ^ int(state[1])) & (2**63 - 1)


@dataclass
class RunState:
    """Everything that, with the model and its optimizer, fixes where a run stands."""

    epoch: int = 0                # the epoch being trained (or next to train)
    batch: int = 0                # batches of ``epoch`` already trained
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    train_seconds: float = 0.0    # training + growth + phase wall time, over all sessions
    history: list = field(default_factory=list)
    growths: list = field(default_factory=list)
    similarity: dict = field(default_factory=dict)
    phase_layers: list = field(default_factory=list)   # joint phase in progress
    phase_remaining: int = 0
    phase_seconds: float = 0.0    # wall time of the similarity phases (part of train_seconds)
    growth_seconds: float = 0.0   # wall time of the growths themselves (part of train_seconds)
    epoch_seconds: list = field(default_factory=list)  # training-step time of each epoch

    def to_extra(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    def add_step_seconds(self, epoch: int, seconds: float) -> None:
        """Count one training step of (0-based) ``epoch``: in the run's and the epoch's time."""
        self.train_seconds += seconds
        while len(self.epoch_seconds) <= epoch:
            self.epoch_seconds.append(0.0)
        self.epoch_seconds[epoch] += seconds

    def epoch_record(self, epoch: int, lr: float) -> dict[str, Any]:
        """The training half of epoch ``epoch``'s history entry (0-based ``epoch``)."""
        return {"epoch": epoch + 1, "train_loss": self.loss_sum / max(self.seen, 1),
                "train_accuracy": 100.0 * self.correct / max(self.seen, 1), "lr": lr}


def progress_bar(total: int, initial: int, desc: str, enabled: bool, leave: bool = True):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, leave=leave,
                dynamic_ncols=True)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        # a truncated or foreign file: say which, and how to recover
        raise ValueError(f"cannot read {path} ({err}); delete it or pass --fresh to start "
                         f"over") from None


def write_json(path: Path, value: Any) -> None:
    """Write whole or not at all (:func:`.files.write_atomic`)."""
    write_atomic(path, json.dumps(value, indent=1))


def raise_mismatch(out: Path, old: dict, new: dict) -> None:
    diff = {k: (old.get(k), new.get(k)) for k in set(old) | set(new) if old.get(k) != new.get(k)}
    changes = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(diff.items()))
    raise ValueError(f"{out} holds a run with other settings ({changes}); choose another "
                     f"output folder or pass --fresh to start over")


def saved_code(saved: Mapping[str, Any]) -> str | None:
    """The code fingerprint a result or checkpoint records; ``None`` for one written before
    fingerprints were recorded (or holding something else)."""
    code = saved.get("code")
    return code if isinstance(code, str) and _FINGERPRINT.fullmatch(code) else None


def code_status(saved: Mapping[str, Any], *, finished: bool, reuse_other_code: bool) -> str:
    """What becomes of a saved run with this run's settings (a result when ``finished``, else
    a checkpoint's extra): reused or resumed when this code wrote it; otherwise run again
    (:data:`CODE_CHANGED`), unless ``reuse_other_code`` asks to take it anyway."""
    if saved_code(saved) == code_fingerprint():
        return REUSED if finished else RESUMED
    if reuse_other_code:
        return REUSED_OTHER_CODE if finished else RESUMED_OTHER_CODE
    return CODE_CHANGED


def set_aside(path: Path, saved: Mapping[str, Any]) -> Path:
    """Rename ``path``, a file another version of the code wrote, to ``<stem>.code-<its
    fingerprint><suffix>`` beside it (``code-unknown`` when it records none).

    An earlier file of that name is replaced: the same code with the same settings wrote it,
    so it holds the same run.
    """
    target = path.with_name(f"{path.stem}.code-{saved_code(saved) or 'unknown'}{path.suffix}")
    os.replace(path, target)
    return target


def _read_result(result_path: Path) -> dict[str, Any] | None:
    if not result_path.exists():
        return None
    previous = read_json(result_path)
    if not isinstance(previous, dict):
        raise ValueError(f"{result_path} is not a run result; delete it or pass --fresh "
                         f"to start over")
    return previous


def finished_status(config: RunConfig, out: Path, *, reuse_other_code: bool) -> str | None:
    """:func:`code_status` of the finished result in ``out``; ``None`` when there is none, it
    cannot be read or it has other settings (:func:`finished_result` says so). Changes
    nothing."""
    try:
        previous = _read_result(out / RESULT)
    except ValueError:
        return None
    if previous is None or previous.get("key") != config.training_key():
        return None
    return code_status(previous, finished=True, reuse_other_code=reuse_other_code)


def finished_result(config: RunConfig, out: Path, *, resume: bool,
                    reuse_other_code: bool = False) -> dict[str, Any] | None:
    """The finished result in ``out`` when it has ``config``'s settings, this code wrote it
    (or ``reuse_other_code`` is on) and ``resume`` is on.

    ``resume=False`` removes it at once (an interrupted fresh run leaves no stale result);
    a result of other settings is refused with the way out; one of other code is set aside
    (:func:`set_aside`) and the run starts again.
    """
    result_path, key = out / RESULT, config.training_key()
    if not resume:
        result_path.unlink(missing_ok=True)
        return None
    previous = _read_result(result_path)
    if previous is None:
        return None
    if previous.get("key") != key:
        raise_mismatch(out, previous.get("key", {}), key)
    status = code_status(previous, finished=True, reuse_other_code=reuse_other_code)
    if status == CODE_CHANGED:
        set_aside(result_path, previous)
        return None
    return previous


def begin_run(config: RunConfig, out_dir: str | Path, *, resume: bool,
              reuse_other_code: bool = False) -> tuple[Path, dict[str, Any] | None]:
    """``config`` checked and ``out_dir`` made; with it the finished result to reuse, if any."""
    if not isinstance(config, RunConfig):
        raise TypeError(f"config must be a RunConfig, got {type(config).__name__}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out, finished_result(config, out, resume=resume, reuse_other_code=reuse_other_code)


def run_dataset(config: RunConfig, dataset: Any = None) -> Any:
    """``dataset``, or ``config``'s dataset loaded (the runners share one in compare mode)."""
    if dataset is not None:
        return dataset
    from .data import load_dataset

    return load_dataset(config.dataset, root=config.data_root, seed=config.data_seed,
                        train_limit=config.train_limit, test_limit=config.test_limit,
                        val_fraction=config.val_fraction)


def growth_record(epoch: int, report: Any, seconds: float,
                  accuracy: dict[str, Any]) -> dict[str, Any]:
    """The record of the growth after ``epoch`` (0-based) from its ``GrowthReport``; its
    ``phase`` is filled by the phase, if one runs."""
    return {"epoch": epoch + 1, "budget": report.budget, "added": report.added,
            "params_before": report.params_before, "params_after": report.params_after,
            "grown_layers": report.grown_layers, "growth_seconds": seconds,
            "phase_seconds": 0.0, "accuracy": accuracy, "phase": None}


def weight_record(rows: np.ndarray, name: str) -> dict[str, Any]:
    """The Fig. 6 statistics of one layer whose float64 weights ``rows`` have neurons first."""
    s = simcore.similarity_stats(rows)
    return {"layer": name, "neurons": int(rows.shape[0]),
            "counts": [int(c) for c in s.counts], "edges": [float(e) for e in s.edges],
            "share_within_half": float(s.share_within_half), "mean_abs": float(s.mean_abs),
            "max_abs": float(s.max_abs), "pairs": int(s.pairs)}


def phase_layer_record(before: np.ndarray, after: np.ndarray, name: str) -> dict[str, Any]:
    """What a phase did to one layer (float64 weights before and after it, neurons first)."""
    scale_before = max(float(np.sqrt(np.mean(before * before))), 1e-300)
    return {
        "before": weight_record(before, name), "after": weight_record(after, name),
        "relative_change": float(np.linalg.norm(after - before)
                                 / max(float(np.linalg.norm(before)), 1e-300)),
        "scale_drift": float(np.sqrt(np.mean(after * after)) / scale_before - 1.0),
    }


def similarity_summary(layers: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Mean |cos| and share in [-0.5, 0.5] of each layer (float64, neurons first), and means."""
    records = {}
    for name, rows in layers.items():
        stats = weight_record(rows, name)
        records[name] = {"mean_abs": stats["mean_abs"],
                         "share_within_half": stats["share_within_half"]}
    return {"layers": records,
            "mean_abs": float(np.mean([v["mean_abs"] for v in records.values()])),
            "share_within_half": float(np.mean([v["share_within_half"]
                                                for v in records.values()]))}


def make_result(config: RunConfig, key: dict, state: RunState, *, device: str,
                parameters_final: int, widths_final: list[int],
                resumed_from_code: Sequence[str] = ()) -> dict[str, Any]:
    """The JSON-ready result of a finished run (what ``result.json`` holds).

    ``code`` is this code's fingerprint; ``resumed_from_code`` lists the fingerprints of other
    code that trained part of the run (resumed with ``reuse_other_code``), usually none.
    """
    final = state.history[-1]
    accuracies = [h["test_accuracy"] for h in state.history[1:]]
    # training steps only (a joint phase's steps included): the unit a growth's cost is given in
    epoch_seconds = float(np.mean(state.epoch_seconds)) if state.epoch_seconds else None
    for record in state.growths:
        # what a growth costs in the unit a user plans in: epochs of this very run
        record["growth_epochs"] = (record["growth_seconds"] / epoch_seconds
                                   if epoch_seconds else None)
    return {
        "label": config.label, "key": key, "code": code_fingerprint(),
        "resumed_from_code": list(resumed_from_code), "config": config.to_dict(),
        "device": device,
        "final_accuracy": final["test_accuracy"], "best_accuracy": max(accuracies),
        "final_val_accuracy": final.get("val_accuracy"),
        "training_seconds": state.train_seconds, "phase_seconds": state.phase_seconds,
        "growth_seconds": state.growth_seconds, "epoch_seconds": state.epoch_seconds,
        "mean_epoch_seconds": epoch_seconds,
        "final_similarity": state.similarity.get("final_all"),
        "parameters_seed": state.history[0]["parameters"],
        "parameters_final": parameters_final, "widths_final": widths_final,
        "phase_steps": config.phase_steps_or_default if config.terms != "none" else None,
        "history": state.history, "growths": state.growths, "similarity": state.similarity,
    }
