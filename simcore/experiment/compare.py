"""Several runs — methods x similarity terms x seeds — on one dataset, then the table and figures.

:func:`run_experiment` is what ``simcore grow`` calls: every run lives in
``<out>/runs/<label>/`` (its checkpoint and ``result.json``), so re-running the
same command reuses finished runs and resumes an interrupted one, as long as the
same code wrote them (:mod:`.fingerprint`: otherwise they run again, unless
``reuse_other_code``); the combined results, the paper-shaped table and the
figures go to ``<out>/``.
"""

from __future__ import annotations

import concurrent.futures
import functools
import multiprocessing
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import METHODS, TERMS, RunConfig, estimate_seconds
from .data import ImageDataset, load_dataset, normalize
from .fingerprint import code_fingerprint
from .gradcam import grad_cam
from .lock import OutputLock
from .measure import growth_line
from .report import code_line, format_n_sweep, format_table, summarize, write_results
from .run_common import CODE_CHANGED, RESUMED, RESUMED_OTHER_CODE, REUSED, REUSED_OTHER_CODE
from .runner import CHECKPOINT, Hooks, load_model, resolve_device
from .runner import run_one as run_torch
from .runner import run_status as torch_status
from .statistics import MODEL_NAMES, conclusion, paired_differences, select_n_best, terms_label

__all__ = ["REUSE_FLAG", "code_note", "gradcam_figure", "run_experiment"]

#: The command-line flag that reuses runs written by other code (named in the messages).
REUSE_FLAG = "--reuse-runs-from-other-code"


def _check_list(values: Sequence[Any], allowed: Sequence[Any] | None, name: str) -> list:
    if isinstance(values, str) or not isinstance(values, Sequence) or not values:
        raise ValueError(f"{name} must be a non-empty list")
    if allowed is not None:
        for v in values:
            if v not in allowed:
                raise ValueError(f"{name} holds {v!r}; expected values from {tuple(allowed)}")
    if len(set(values)) != len(values):
        raise ValueError(f"{name} holds duplicates: {list(values)}")
    return list(values)


def _one_per_class(dataset: ImageDataset, count: int) -> torch.Tensor:
    """Indices of the first test image of each of the first ``count`` classes present."""
    labels = dataset.test_labels.cpu()
    picks = []
    for cls in range(dataset.num_classes):
        hits = torch.nonzero(labels == cls)
        if len(hits):
            picks.append(int(hits[0, 0]))
        if len(picks) == count:
            break
    return torch.tensor(picks, dtype=torch.long)


def run_one(config: RunConfig, out_dir: Path, **kwargs: Any) -> dict[str, Any]:
    """One run with the runner of ``config.framework`` (JAX's imported only when asked for)."""
    if config.framework == "jax":
        from .jax_runner import run_one as run_jax

        return run_jax(config, out_dir, **kwargs)
    return run_torch(config, out_dir, **kwargs)


def run_status(config: RunConfig, out_dir: Path, *,
               reuse_other_code: bool = False) -> tuple[str, int]:
    if config.framework == "jax":
        from .jax_runner import run_status as jax_status

        return jax_status(config, out_dir, reuse_other_code=reuse_other_code)
    return torch_status(config, out_dir, reuse_other_code=reuse_other_code)


def data_device(config: RunConfig) -> torch.device:
    """Where the data pipeline's tensors live: the training device for PyTorch runs, the CPU
    for JAX runs (each batch is converted and put on the JAX device)."""
    return resolve_device(config.device) if config.framework == "torch" else torch.device("cpu")


def run_device(config: RunConfig) -> str:
    """The device the runs train on, as the plan line names it."""
    if config.framework == "jax":
        from .jax_runner import resolve_device as jax_device

        return f"{jax_device(config.device).platform} (JAX)"
    return str(resolve_device(config.device))


#: Grad-CAM shows one test image per class, for at most this many classes (all of the digits'
#: and CIFAR-10's; CIFAR-100's first ten, as the figure's title says).
GRADCAM_CLASSES = 10


def gradcam_figure(baseline_dir: str | Path, other_dir: str | Path, dataset: ImageDataset,
                   path: str | Path, *, count: int = GRADCAM_CLASSES,
                   labels=("baseline", "+ours"), device: str | torch.device = "cpu",
                   title: str | None = None) -> Path:
    """Fig. 4 from two finished runs: one test image per class (the first ``count`` classes),
    and both models' Grad-CAM for the true class."""
    from .figures import plot_gradcam

    index = _one_per_class(dataset, count)
    raw = dataset.test_images[index.to(dataset.test_images.device)].to(device)
    targets = dataset.test_labels[index.to(dataset.test_labels.device)].to(device)
    inputs = normalize(raw, dataset)
    rows = []
    for label, run_dir in zip(labels, (baseline_dir, other_dir), strict=True):
        model = load_model(Path(run_dir) / CHECKPOINT, device=device)
        rows.append((label, grad_cam(model, inputs, targets).cpu().numpy()))
    images = raw.permute(0, 2, 3, 1).cpu().numpy().astype(np.float64) / 255.0
    shown = len(index)
    classes = (f"one test image of each of the {shown} classes" if shown == dataset.num_classes
               else f"one test image of each of the first {shown} of {dataset.num_classes} "
                    f"classes")
    heading = (f"{title + ': ' if title else ''}Grad-CAM of the true class at the end of "
               f"training, {classes} of {dataset.name}")
    return plot_gradcam(images, rows, path, titles=[f"class {int(t)}" for t in targets],
                        title=heading)


def run_experiment(
    base: RunConfig,
    *,
    methods: Sequence[str],
    terms: Sequence[str],
    seeds: Sequence[int],
    out_dir: str | Path,
    phase_steps: Sequence[int | None] | None = None,
    fresh: bool = False,
    figures: bool = True,
    progress: bool = False,
    hooks: Hooks | None = None,
    echo: Callable[[str], None] | None = print,
    jobs: int = 1,
    threads: int = 1,
    reuse_other_code: bool = False,
) -> dict[str, Any]:
    """Run every (method, terms, N, seed) on ``base``, then write results, table and figures.

    ``phase_steps`` lists the N of the runs with a phase (default: ``base``'s
    own); several values make an N sweep, whose N_best is chosen on the
    validation split. ``jobs > 1`` runs that many
    runs at once in worker processes of ``threads`` torch threads each (then
    ``hooks`` cannot be used). Returns ``{"results": [...], "summary": [...],
    "table": str, "files": {kind: path}, "statuses": [...]}`` (each run's
    ``run_status``: "new", "reused", "code_changed", ...). ``fresh`` discards earlier runs
    in ``out_dir``; otherwise finished runs are reused and an interrupted one resumes when
    this code wrote them, and those of other code run again (kept beside as
    ``*.code-<fingerprint>.*``; the table says how many) unless ``reuse_other_code``.
    """
    if not isinstance(base, RunConfig):
        raise TypeError(f"base must be a RunConfig, got {type(base).__name__}")
    methods = _check_list(methods, METHODS, "methods")
    terms = _check_list(terms, TERMS, "terms")
    seeds = _check_list(seeds, None, "seeds")
    phase_steps = _check_list([base.phase_steps] if phase_steps is None else phase_steps, None,
                              "phase_steps")
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    if jobs > 1 and hooks is not None:
        raise ValueError("hooks run in this process: use jobs=1 with hooks")
    if fresh and reuse_other_code:
        raise ValueError(f"--fresh discards the earlier runs that {REUSE_FLAG} would reuse: "
                         f"choose one")
    configs = [base.replace(method=m, terms=t, seed=s, phase_steps=n)
               for m in methods for t in terms for n in (phase_steps if t != "none" else [None])
               for s in seeds]  # validates every seed and N
    out = Path(out_dir)
    with OutputLock(out):  # one simcore grow per folder: two would overwrite each other
        dataset = _load(base)
        device = data_device(base)
        dataset = dataset.to(device)
        say = echo or (lambda _text: None)
        for config in configs:
            run_dir = out / "runs" / config.label
            if fresh and run_dir.exists():
                shutil.rmtree(run_dir)
        statuses = [run_status(config, out / "runs" / config.label,
                               reuse_other_code=reuse_other_code) for config in configs]
        say(_plan_line(base, configs, statuses, dataset, run_device(base), jobs, out))
        done = 0

        def report(config: RunConfig, result: dict[str, Any]) -> None:
            nonlocal done
            done += 1
            status, epoch = statuses[configs.index(config)]
            seconds = result["training_seconds"]
            if status == REUSED:
                trained = f"reused from an earlier run (which trained {seconds:.1f} s)"
            elif status == REUSED_OTHER_CODE:
                trained = (f"reused from an earlier run of other code "
                           f"({result.get('code') or 'not recorded'}) as {REUSE_FLAG} asks "
                           f"(which trained {seconds:.1f} s)")
            else:
                trained = (f"{seconds:.1f} s of training steps, growths and phases (evaluation "
                           f"excluded)")
                if status in (RESUMED, RESUMED_OTHER_CODE):
                    trained = (f"resumed from epoch {epoch} of {config.epochs}; {trained}, "
                               f"all sessions")
                if status == RESUMED_OTHER_CODE:
                    trained += f"; its checkpoint was other code's, resumed as {REUSE_FLAG} asks"
                if status == CODE_CHANGED:
                    trained = (f"trained again, the code changed since its earlier run (kept "
                               f"as *.code-<fingerprint>.*); {trained}")
            say(f"[{done}/{len(configs)}] {config.label}: accuracy "
                f"{result['final_accuracy']:.2f}%, {result['parameters_seed']} -> "
                f"{result['parameters_final']} parameters, {trained}")
            for record in result["growths"]:
                say("    " + growth_line(record))

        # a bar on a terminal; elsewhere a plain line now and then
        lines = _EpochLines(sum(c.epochs for c in configs), None if progress else echo)
        if jobs == 1:
            results = []
            for config in configs:
                result = run_one(config, out / "runs" / config.label, dataset=dataset,
                                 progress=progress, hooks=_with_ticks(hooks, lines),
                                 resume=not fresh, reuse_other_code=reuse_other_code)
                report(config, result)
                results.append(result)
        else:
            results = _run_parallel(configs, out, jobs, threads, progress, report, lines,
                                    reuse_other_code)
        files = write_results(results, out)
        summary = summarize(results)
        table = format_table(summary) + "\n" + code_line(results)
        note = code_note([status for status, _ in statuses])
        if note:
            table += "\n" + note
        sweeps = {}
        if len(phase_steps) > 1:  # N_best from the validation split, never the test split
            sweeps = {m: select_n_best(results, method=m, model=base.model) for m in methods
                      if "both" in terms}
            table += "\n\n" + "\n".join(format_n_sweep(s) for s in sweeps.values())
        if figures:
            n_best = {m: s["n_best"] for m, s in sweeps.items()}
            files.update(_figures(results, configs, out, dataset, device, n_best))
            if base.framework != "torch":
                say("Grad-CAM (Fig. 4) is drawn from PyTorch checkpoints: not for "
                    f"--framework {base.framework} runs")
    return {"results": results, "summary": summary, "table": table, "files": files,
            "conclusion": conclusion(paired_differences(results)), "n_sweeps": sweeps,
            "statuses": [status for status, _ in statuses]}


def code_note(statuses: Sequence[str]) -> str:
    """One line per run status that involves other code: how many of the runs were trained
    again because the code changed, and how many other code's runs were reused anyway;
    "" when every run is this code's."""
    total = len(statuses)
    again = sum(status == CODE_CHANGED for status in statuses)
    taken = sum(status in (REUSED_OTHER_CODE, RESUMED_OTHER_CODE) for status in statuses)
    lines = []
    if again:
        lines.append(f"{again} of {total} run(s) trained again because the code changed since "
                     f"their earlier runs (this code: {code_fingerprint()}; the earlier files "
                     f"are kept beside as *.code-<fingerprint>.*)")
    if taken:
        lines.append(f"{taken} of {total} run(s) reused or resumed from other code as "
                     f"{REUSE_FLAG} asks: their numbers are not all this code's "
                     f"({code_fingerprint()})")
    return "\n".join(lines)


def _plan_line(base: RunConfig, configs: Sequence[RunConfig], statuses: Sequence[tuple[str, int]],
               dataset: ImageDataset, device: str, jobs: int, out: Path) -> str:
    """The first line of ``simcore grow``: what will run, on what, and roughly how long."""
    train = dataset.train_labels.shape[0]
    held = train + (dataset.val_labels.shape[0] if dataset.has_validation else 0)
    validation = f" / {dataset.val_labels.shape[0]} validation" if dataset.has_validation else ""
    line = (f"simcore grow: {len(configs)} run(s) on {dataset.name} ({train} train{validation} / "
            f"{dataset.test_labels.shape[0]} test images), {base.model}, {base.epochs} epochs, "
            f"device {device}" + (f", {jobs} runs at a time" if jobs > 1 else "")
            + f"; output in {out}")
    if base.train_limit is not None and base.train_limit > held:
        line += (f"\n  note: --train-limit {base.train_limit} is more than the {held} training "
                 f"images of {dataset.name}: all of them are used")
    reused = sum(status == REUSED for status, _ in statuses)
    reused_other = sum(status == REUSED_OTHER_CODE for status, _ in statuses)
    again = sum(status == CODE_CHANGED for status, _ in statuses)
    if reused:
        line += f"\n  {reused} run(s) finished earlier in {out}: reused, not trained again"
    if reused_other:
        line += (f"\n  {reused_other} run(s) finished earlier in {out} by other code: reused, "
                 f"not trained again, as {REUSE_FLAG} asks")
    if again:
        line += (f"\n  {again} run(s) in {out} were written by other code (or before runs "
                 f"recorded their code; this code: {code_fingerprint()}): trained again, their "
                 f"files kept beside as *.code-<fingerprint>.* ({REUSE_FLAG} would reuse them)")
    for c, (status, epoch) in zip(configs, statuses, strict=True):
        if status == RESUMED:
            line += f"\n  {c.label}: resumed from its checkpoint after epoch {epoch}"
        if status == RESUMED_OTHER_CODE:
            line += (f"\n  {c.label}: resumed from its checkpoint after epoch {epoch}, "
                     f"written by other code, as {REUSE_FLAG} asks")
    epochs_left = sum(c.epochs - epoch for c, (status, epoch) in zip(configs, statuses,
                                                                      strict=True)
                      if status not in (REUSED, REUSED_OTHER_CODE))
    if epochs_left:
        seconds = estimate_seconds(base.replace(device=device.split(":")[0]), epochs_left,
                                   train, min(jobs, len(configs) - reused - reused_other))
        line += ("\n  expected time: " + (
            f"about {_duration(seconds)} for the training (measured on a 2-core CPU; "
            f"imports, data and figures add 10-20 s)" if seconds is not None else
            f"no measured cost for {base.model} on {dataset.name} on {device}: "
            f"{epochs_left} epochs in all; each run prints a line when it ends"))
    return line


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def _load(config: RunConfig) -> ImageDataset:
    return load_dataset(config.dataset, root=config.data_root, seed=config.data_seed,
                        train_limit=config.train_limit, test_limit=config.test_limit,
                        val_fraction=config.val_fraction)


@functools.lru_cache(maxsize=4)
def _worker_dataset(config: RunConfig) -> ImageDataset:
    return _load(config).to(data_device(config))


def _worker_run(config: RunConfig, run_dir: Path, threads: int, events: Any,
                reuse_other_code: bool) -> dict[str, Any]:
    """One run in a worker process; each finished epoch is reported on ``events``."""
    torch.set_num_threads(threads)
    data_config = config.replace(method="random", terms="none", seed=0, phase_steps=None)
    hooks = Hooks(on_epoch_end=lambda _epoch, _record: events.put(1))
    # resume: the parent already removed the folders of a fresh start
    return run_one(config, run_dir, dataset=_worker_dataset(data_config), hooks=hooks,
                   reuse_other_code=reuse_other_code)


#: Seconds between two plain progress lines (when no progress bar is drawn).
PROGRESS_LINE_SECONDS = 10.0


class _EpochLines:
    """Plain progress lines where no bar is drawn (output to a file or a pipe).

    Counts finished epochs over all runs and prints at most one line every ``every``
    seconds, so a log shows the run moving without one line per epoch of every run.
    """

    def __init__(self, total: int, say: Callable[[str], None] | None):
        self.total, self.say, self.every = total, say, PROGRESS_LINE_SECONDS
        self.done = 0
        self.started = self.last = time.perf_counter()
        self._lock = threading.Lock()

    def tick(self) -> None:
        with self._lock:
            self.done += 1
            now = time.perf_counter()
            if self.say is None or now - self.last < self.every:
                return
            self.last = now
            self.say(f"  ... {self.done}/{self.total} epochs of all runs done "
                     f"({100 * self.done / max(self.total, 1):.0f}%), {now - self.started:.0f} s "
                     f"so far")


def _with_ticks(hooks: Hooks | None, lines: _EpochLines) -> Hooks:
    """``hooks`` with every finished epoch also counted by ``lines``."""
    user = hooks.on_epoch_end if hooks is not None else None

    def on_epoch_end(epoch: int, record: dict) -> None:
        lines.tick()
        if user is not None:
            user(epoch, record)

    return Hooks(on_batch_end=hooks.on_batch_end if hooks is not None else None,
                 on_epoch_end=on_epoch_end)


def _run_parallel(configs, out, jobs, threads, progress, report, lines,
                  reuse_other_code) -> list[dict[str, Any]]:
    from tqdm.auto import tqdm

    context = multiprocessing.get_context("spawn")  # fork after torch's thread pools can hang
    with context.Manager() as manager:
        events = manager.Queue()
        bar = tqdm(total=sum(c.epochs for c in configs), desc="epochs (all runs)",
                   disable=not progress, dynamic_ncols=True)

        def follow():
            while events.get() is not None:
                bar.update(1)
                lines.tick()

        follower = threading.Thread(target=follow, daemon=True)
        follower.start()
        results: dict[int, dict[str, Any]] = {}  # by config index, in completion order
        try:
            with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
                futures = {pool.submit(_worker_run, config, out / "runs" / config.label,
                                       threads, events, reuse_other_code): index
                           for index, config in enumerate(configs)}
                for future in concurrent.futures.as_completed(futures):
                    index = futures[future]
                    results[index] = future.result()
                    with tqdm.external_write_mode():  # lines above the bar, not through it
                        report(configs[index], results[index])
        finally:
            events.put(None)
            follower.join(timeout=5)
            bar.close()
    return [results[index] for index in range(len(configs))]


def _figures(results, configs, out, dataset, device, n_best) -> dict[str, Path]:
    base = configs[0]
    from .figures import plot_curves, plot_phase_similarity, plot_similarity

    files = {"similarity_figure": plot_similarity(results, out / "similarity_layer2.png"),
             "curves_figure": plot_curves(results, out / "curves.png")}

    def shown(result):  # an N sweep shows its N_best only
        method = result["config"]["method"]
        return method not in n_best or result["config"]["phase_steps"] == n_best[method]

    phased = [r for r in results if any(g["phase"] for g in r["growths"]) and shown(r)]
    if phased:
        files["phase_similarity_figure"] = plot_phase_similarity(
            phased, out / "similarity_phases.png")
    if base.framework != "torch":  # Grad-CAM reads PyTorch checkpoints; a JAX run has none
        return files
    first_seed = configs[0].seed
    by_key = {(c.method, c.terms, c.seed): c for c in configs}
    for method in dict.fromkeys(c.method for c in configs):
        baseline = by_key.get((method, "none", first_seed))
        other = next((by_key[(method, t, first_seed)] for t in ("both", "eq2", "eq4")
                      if (method, t, first_seed) in by_key), None)
        if baseline is None or other is None:
            continue
        files[f"gradcam_{method}"] = gradcam_figure(
            out / "runs" / baseline.label, out / "runs" / other.label, dataset,
            out / f"gradcam_{method}.png", device=device,
            labels=(terms_label(method, "none"), terms_label(method, other.terms)),
            title=f"{MODEL_NAMES.get(base.model, base.model)}, seed {first_seed}")
    return files
