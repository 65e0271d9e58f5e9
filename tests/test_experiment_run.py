"""`simcore grow` end to end on tiny settings: every method with and without the similarity
phase, outputs and figures, exact resumption after an interruption, and the console command."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from simcore.experiment import (
    Hooks,
    RunInterrupted,
    preset,
    run_experiment,
    run_one,
)
from simcore.experiment.data import load_digits_dataset
from simcore.experiment.measure import growth_line

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SEED_PARAMETERS = 1990  # vgg16(width=4) at 10 classes

# Seed width 4 and 64 images: every method, 2 epochs, one growth after epoch 1.
TINY = preset("quick").replace(
    width=4, epochs=2, grow_every=1, max_growths=1, batch_size=32, growth_batches=1,
    firefly_candidates=4, train_limit=64, test_limit=32, phase_steps=5, phase_lr=0.05)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny convolutions gain nothing from threads, and on a busy CI machine two torch threads
    # waiting for each other make these runs many times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_seed_size():
    from simcore.adapters.torch import vgg16

    assert sum(p.numel() for p in vgg16(width=4).parameters()) == SEED_PARAMETERS


@pytest.fixture(scope="module")
def experiment(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("grow")
    outcome = run_experiment(TINY, methods=["random", "ssd", "firefly"], terms=["none", "both"],
                             seeds=[0], out_dir=out, echo=None)
    return out, outcome


def test_every_method_grows_with_and_without_the_phase(experiment):
    _, outcome = experiment
    results = outcome["results"]
    assert [(r["config"]["method"], r["config"]["terms"]) for r in results] == [
        (m, t) for m in ("random", "ssd", "firefly") for t in ("none", "both")]
    for r in results:
        assert len(r["history"]) == TINY.epochs + 1
        (growth,) = r["growths"]
        assert growth["epoch"] == 1 and growth["grown_layers"]
        assert r["parameters_seed"] == SEED_PARAMETERS
        assert r["parameters_final"] == growth["params_after"] > SEED_PARAMETERS
        assert r["history"][-1]["parameters"] == r["parameters_final"]
        assert 0.0 <= r["final_accuracy"] <= 100.0
        assert r["phase_steps"] == (None if r["config"]["terms"] == "none" else 5)
        assert len(r["similarity"]["after_phase"]) == (r["config"]["terms"] != "none")
    for method in ("random", "ssd", "firefly"):
        without, with_phase = [r for r in results if r["config"]["method"] == method]
        # same seed: identical until the growth, so the phase is the only difference
        assert without["history"][1] == with_phase["history"][1]
        assert without["growths"][0]["added"] == with_phase["growths"][0]["added"]
        before = with_phase["similarity"]["after_growth"][0]
        after = with_phase["similarity"]["after_phase"][0]
        if before["layer"] in with_phase["growths"][0]["grown_layers"]:
            # the phase minimises Eq. 5 on the grown layers: layer 2's neurons move apart
            assert after["mean_abs"] < before["mean_abs"]
        else:
            assert after == before
        # every grown layer's phase is measured, with the accuracy around it
        growth = with_phase["growths"][0]
        assert set(growth["phase"]["layers"]) <= set(growth["grown_layers"])
        for layer in growth["phase"]["layers"].values():
            assert layer["after"]["mean_abs"] < layer["before"]["mean_abs"]
            assert layer["relative_change"] > 0 and abs(layer["scale_drift"]) < 0.05
        for moment in ("before_growth", "after_growth", "after_phase"):
            assert set(growth["accuracy"][moment]) == {"test", "val"}
        assert without["growths"][0]["phase"] is None
        assert without["growths"][0]["accuracy"]["after_phase"] is None
        assert 0 < with_phase["phase_seconds"] < with_phase["training_seconds"]
        for run in (without, with_phase):
            # a growth's cost in epochs of its run: its seconds over the mean training-step
            # time of an epoch, which the steps of every epoch add up to
            assert len(run["epoch_seconds"]) == TINY.epochs
            assert 0 < run["mean_epoch_seconds"] < run["training_seconds"]
            # training time is exactly the steps, the growths and the weights-only phases
            phases = sum(g["phase_seconds"] for g in run["growths"])
            assert sum(run["epoch_seconds"]) + run["growth_seconds"] + phases == pytest.approx(
                run["training_seconds"])
            (growth,) = run["growths"]
            assert growth["growth_epochs"] == pytest.approx(
                growth["growth_seconds"] / run["mean_epoch_seconds"])
            assert growth["growth_epochs"] > 0
            assert f"= {growth['growth_epochs']:.2f} epochs" in growth_line(growth)
        layers = with_phase["final_similarity"]["layers"]
        assert len(layers) == 14 and with_phase["final_similarity"]["mean_abs"] > 0


def test_results_tables_and_figures_are_written(experiment):
    out, outcome = experiment
    saved = json.loads((out / "results.json").read_text())
    assert [r["label"] for r in saved] == [r["label"] for r in outcome["results"]]
    with (out / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 6 and {row["terms"] for row in rows} == {"none", "both"}
    assert float(rows[0]["final_accuracy"]) == outcome["results"][0]["final_accuracy"]
    lines = outcome["table"].split("\n\n")[0].splitlines()
    assert lines[0].split()[:3] == ["Method", "Architecture", "Accuracy"]
    assert [line.split()[0] for line in lines[1:]] == [
        "Random", "Random+ours", "SSD", "SSD+ours", "Firefly", "Firefly+ours"]
    assert (out / "table.txt").read_text().startswith(outcome["table"])
    figures = ["similarity_layer2.png", "similarity_phases.png", "curves.png",
               "gradcam_random.png", "gradcam_ssd.png", "gradcam_firefly.png"]
    for name in figures:
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 2000, name


def test_rerunning_reuses_finished_runs_and_refuses_changed_settings(experiment):
    out, outcome = experiment
    config = TINY.replace(method="random", terms="both")
    again = run_one(config, out / "runs" / config.label)
    assert again == outcome["results"][1]
    with pytest.raises(ValueError, match=r"other settings \(lr: 0.05 -> 0.1\).*--fresh"):
        run_one(config.replace(lr=0.1), out / "runs" / config.label)


def _without_timings(result):
    timings = ("training_seconds", "growth_seconds", "phase_seconds", "epoch_seconds",
               "mean_epoch_seconds", "growth_epochs")
    result = {k: v for k, v in result.items() if k not in timings}
    result["growths"] = [{k: v for k, v in g.items() if k not in timings}
                         for g in result["growths"]]
    return result


def _final_weights(run_dir):
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]


# joint reading: the phase runs inside the training steps after the growth, so an
# interruption inside it must also restore its W_prev snapshot and its step count
JOINT = TINY.replace(method="random", terms="both", phase="joint", phase_steps=3, batch_size=16)


def _assert_resumes_to_the_straight_run(config, run_dir, straight_dir, data):
    reference = run_one(config, straight_dir, dataset=data)
    resumed = run_one(config, run_dir, dataset=data)
    assert _without_timings(resumed) == _without_timings(reference)
    straight, again = _final_weights(straight_dir), _final_weights(run_dir)
    assert straight.keys() == again.keys()
    for key in straight:
        assert torch.equal(straight[key], again[key]), key


def test_resume_after_interruptions_gives_the_uninterrupted_result(tmp_path):
    data = load_digits_dataset(0, train_limit=64, test_limit=32)
    config = JOINT.replace(epochs=3)

    def stop_in_phase(epoch, batch):  # epoch 1, batch 2: two of the three phase steps done
        if (epoch, batch) == (1, 2):
            raise KeyboardInterrupt

    def ctrl_c_in_epoch_2(epoch, batch):  # a real SIGINT: deferred to the end of this batch
        if (epoch, batch) == (2, 1):
            os.kill(os.getpid(), signal.SIGINT)

    def stop_after_epoch_0(epoch, record):
        if epoch == 0:
            raise KeyboardInterrupt

    run_dir = tmp_path / "interrupted"
    for hooks in (Hooks(on_epoch_end=stop_after_epoch_0), Hooks(on_batch_end=stop_in_phase),
                  Hooks(on_batch_end=ctrl_c_in_epoch_2)):
        with pytest.raises(KeyboardInterrupt) as info:
            run_one(config, run_dir, dataset=data, hooks=hooks)
        assert (run_dir / "checkpoint.pt").exists() and not (run_dir / "result.json").exists()
    assert isinstance(info.value, RunInterrupted)  # the SIGINT path stopped cleanly
    _assert_resumes_to_the_straight_run(config, run_dir, tmp_path / "straight", data)


_KILLED_IN_THE_PHASE = """
import os, signal, sys
import torch
from simcore.experiment import Hooks, run_one
from simcore.experiment.data import load_digits_dataset
from test_experiment_run import JOINT
torch.set_num_threads(1)

def kill_9(epoch, batch):  # as kill -9: no handler runs, nothing is saved
    if (epoch, batch) == (1, 2):
        os.kill(os.getpid(), signal.SIGKILL)

run_one(JOINT, sys.argv[1], dataset=load_digits_dataset(0, train_limit=64, test_limit=32),
        hooks=Hooks(on_batch_end=kill_9))
"""


def test_resume_after_kill_9_gives_the_uninterrupted_result(tmp_path):
    # killed in the middle of the joint phase of the last epoch: the checkpoint of epoch 1 (just
    # after the growth) is the last one, and the run started again ends as a straight one ends
    run_dir = tmp_path / "killed"
    child = subprocess.run([sys.executable, "-c", _KILLED_IN_THE_PHASE, str(run_dir)],
                           cwd=os.path.dirname(__file__), capture_output=True, text=True,
                           timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    assert (run_dir / "checkpoint.pt").exists() and not (run_dir / "result.json").exists()
    _assert_resumes_to_the_straight_run(JOINT, run_dir, tmp_path / "straight",
                                        load_digits_dataset(0, train_limit=64, test_limit=32))


@pytest.mark.slow  # long: see tests/conftest.py for the two tiers
def test_the_console_command_runs_and_prints_the_table(tmp_path):
    command = [sys.executable, "-m", "simcore", "grow", "--method", "random", "--similarity",
               "on", "--width", "4", "--epochs", "2", "--grow-every", "1", "--max-growths", "1",
               "--train-limit", "32", "--test-limit", "16", "--batch-size", "16", "--N", "3",
               "--no-figures", "--quiet", "--threads", "1", "--out", str(tmp_path / "out")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("Method"))
    n_column = lines[header].index("  N  ") + 2
    row = lines[header + 1]
    assert row.split()[:2] == ["Random+ours", "VGG16"] and row[n_column] == "3"
    assert (tmp_path / "out" / "results.csv").exists()
    bad = subprocess.run(command[:4] + ["--dataset", "cifar10", "--data-root", str(tmp_path),
                                        "--quiet", "--out", str(tmp_path / "x")],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "cifar-10-batches-py" in bad.stderr


def _output_while_running(command, path, timeout=300):
    """Run ``command`` with stdout to the file ``path``; return the file's contents (lists of
    lines) as read at moments when the process was still running afterwards."""
    snapshots: list[list[str]] = []
    with open(path, "w") as out:
        # without PYTHONUNBUFFERED: the command itself must write its lines through
        env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.PIPE, text=True,
                                   env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = path.read_text().splitlines()
            if process.poll() is not None:
                break
            if not snapshots or snapshots[-1] != lines:
                snapshots.append(lines)  # read before poll() said "still running"
            time.sleep(0.05)
        else:
            process.kill()
        _, err = process.communicate()
    assert process.returncode == 0, err
    return snapshots


@pytest.mark.slow  # a subprocess run end to end; the full tier (CI) runs it
def test_the_console_command_reports_progress_into_a_file_while_it_runs(tmp_path):
    """stdout redirected (block-buffered unless told otherwise): the plan line with its time
    estimate, then a line per finished run, each in the file before the table is."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "simcore", "grow", "--method", "random", "--similarity",
               "both", "--width", "4", "--epochs", "2", "--grow-every", "1", "--max-growths",
               "1", "--train-limit", "32", "--test-limit", "16", "--batch-size", "16", "--N",
               "3", "--seeds", "0", "--no-figures", "--threads", "1", "--jobs", "1", "--out",
               str(out)]
    snapshots = _output_while_running(command, tmp_path / "stdout.txt")
    assert any(lines and lines[0].startswith("simcore grow: 2 run(s) on digits")
               and any(line.startswith("[1/2] vgg16-random-none-seed0") for line in lines)
               and not any(line.startswith("Method") for line in lines)
               for lines in snapshots), snapshots
    first = (tmp_path / "stdout.txt").read_text()
    assert "expected time: about" in first and "s of training steps" in first
    assert "total wall time" in first and "imports" in first
    # a rerun says which results it reuses and trains nothing again
    (out / "runs" / "vgg16-random-both-seed0-N3" / "result.json").unlink()  # resumed instead
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "1 run(s) finished earlier" in again.stdout
    assert "vgg16-random-both-seed0-N3: resumed from its checkpoint after epoch 2" in again.stdout
    assert "vgg16-random-none-seed0: accuracy" in again.stdout
    assert "reused from an earlier run (which trained" in again.stdout


def test_grow_errors_and_warnings_name_the_flags(capsys):
    from simcore.experiment.cli import build_parser, main, plan

    for argv, message in [
        (["--N", "-3"], "--N must be >= 0, got -3"),
        (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (["--grow-every", "0"], "--grow-every must be >= 1"),
        (["--data-root", "somewhere"], "--data-root reads CIFAR files"),
        (["--similarity", "on", "--ablation"], "--ablation runs the baseline"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("simcore grow: error: ") and message in err, (argv, err)
        assert len(err.strip().splitlines()) == 1 and "_" not in err.split(":")[2].split()[0]
    warnings = plan(build_parser().parse_args(
        ["--similarity", "off", "--N", "3", "--lam", "0.1", "--ssd-mode", "fast"]))["warnings"]
    assert warnings == ["--N, --lam ignored: --similarity off runs no similarity phase",
                        "--ssd-mode ignored: it applies to --method ssd only"]


def test_ablation_of_the_two_terms(tmp_path):
    outcome = run_experiment(TINY, methods=["random"], terms=["none", "eq2", "eq4", "both"],
                             seeds=[0], out_dir=tmp_path, figures=False, echo=None)
    none, eq2, eq4, both = outcome["results"]
    header, *rows = outcome["table"].split("\n\n")[0].splitlines()
    assert header.split()[2:4] == ["Eq.2", "Eq.4"]
    assert [row.split()[2:4] for row in rows] == [["x", "x"], ["o", "x"], ["x", "o"], ["o", "o"]]
    # Eq. 4 alone, weights-only right after the snapshot, is exactly 0 with zero gradient:
    # that run is the baseline, bit for bit (the paper's Table 3 shows the same accuracy too)
    assert eq4["history"] == none["history"]
    eq4_weights = _final_weights(tmp_path / "runs" / eq4["label"])
    none_weights = _final_weights(tmp_path / "runs" / none["label"])
    assert all(torch.equal(eq4_weights[k], none_weights[k]) for k in none_weights)
    # the terms with Eq. 2 change the grown layers
    assert eq2["similarity"]["after_phase"] != eq2["similarity"]["after_growth"]
    assert both["similarity"]["after_phase"] != both["similarity"]["after_growth"]


def test_layer_name_skips_depthwise_convs_only():
    from simcore.experiment.runner import layer_name

    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 8, 3, groups=8),  # depthwise: skipped
        torch.nn.Conv2d(8, 8, 1, groups=2), torch.nn.Linear(8, 2))     # grouped: a layer
    assert [layer_name(model, k) for k in (1, 2, 3)] == ["0", "2", "3"]
    with pytest.raises(ValueError, match=r"layer must lie in \[1, 3\]"):
        layer_name(model, 4)


def test_fresh_runs_interrupts_and_result_files_leave_nothing_stale(tmp_path, monkeypatch):
    from simcore.experiment import files, runner

    data = load_digits_dataset(0, train_limit=32, test_limit=16)
    config = TINY.replace(method="random", terms="none", max_growths=0)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "result.json").write_text('{"key": {"model": ')  # truncated by a crash
    with pytest.raises(ValueError, match=r"result.json.*--fresh"):
        run_one(config, run_dir, dataset=data)

    saves = []
    real_save = runner.save_checkpoint
    monkeypatch.setattr(runner, "save_checkpoint",
                        lambda *a, **k: (saves.append(a[0]), real_save(*a, **k)))

    def ctrl_c_at_epoch_end(epoch, record):  # deferred: the run stops after this epoch's save
        os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(RunInterrupted, match="after epoch 1"):
        run_one(config, run_dir, dataset=data, resume=False,
                hooks=Hooks(on_epoch_end=ctrl_c_at_epoch_end))
    assert len(saves) == 1  # the end-of-epoch checkpoint, not written a second time
    assert not (run_dir / "result.json").exists()  # the stale result went with --fresh

    real_temporary = files.tempfile.NamedTemporaryFile

    def crash_mid_write(*args, **kwargs):
        handle = real_temporary(*args, **kwargs)
        real_write = handle.write

        def write(text):
            real_write(text[:10])
            raise OSError("disk full")

        handle.write = write
        return handle

    monkeypatch.setattr(files.tempfile, "NamedTemporaryFile", crash_mid_write)
    with pytest.raises(OSError, match="disk full"):
        run_one(config, run_dir, dataset=data)  # resumes epoch 2, then fails to write
    assert not (run_dir / "result.json").exists()  # no truncated result.json left behind
    assert not list(run_dir.glob("*.tmp"))  # and no temporary
    monkeypatch.setattr(files.tempfile, "NamedTemporaryFile", real_temporary)
    result = run_one(config, run_dir, dataset=data)
    assert json.loads((run_dir / "result.json").read_text()) == result
    assert len(result["history"]) == config.epochs + 1


def test_an_n_sweep_picks_n_best_on_the_validation_split(tmp_path):
    outcome = run_experiment(TINY, methods=["random"], terms=["none", "both"], seeds=[0, 1],
                             phase_steps=[1, 3], out_dir=tmp_path, figures=False, echo=None)
    labels = [r["label"] for r in outcome["results"]]
    assert labels == ["vgg16-random-none-seed0", "vgg16-random-none-seed1",
                      "vgg16-random-both-seed0-N1", "vgg16-random-both-seed1-N1",
                      "vgg16-random-both-seed0-N3", "vgg16-random-both-seed1-N3"]
    validation = {n: sum(r["final_val_accuracy"] for r in outcome["results"]
                         if r["config"]["phase_steps"] == n) / 2 for n in (1, 3)}
    expected = 1 if validation[1] >= validation[3] else 3
    assert outcome["n_sweeps"]["random"]["n_best"] == expected
    assert "N_best" in outcome["table"]


@pytest.mark.slow  # a subprocess run end to end; the full tier (CI) runs it
def test_the_similarity_benchmark_reports_rows_into_a_file_while_it_runs(tmp_path):
    # Benchmarks are long commands too: each row reaches a redirected stdout as it is measured.
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_similarity.py")
    snapshots = _output_while_running([sys.executable, script, "--quick", "--repeats", "3"],
                                      tmp_path / "bench.txt", timeout=300)
    # a snapshot with the first row but not yet the last part: the row was written while the
    # rest was still being measured (block-buffered output would arrive all at once at exit)
    assert any(any("x 1152" in line for line in lines)
               and not any("peak extra memory" in line for line in lines)
               for lines in snapshots), snapshots[-1:]


@pytest.mark.parametrize("config", [TINY.replace(method="random", terms="both"), JOINT],
                         ids=["weights_only", "joint"])
def test_reported_times_leave_out_the_accuracies_measured_around_a_growth(
        tmp_path, monkeypatch, config):
    """``Time (s)`` is training, growth and phase: the accuracies a growth record reports
    (before and after the growth and its phase) are measured off the clock."""
    from simcore.experiment import measure, runner

    offset = [0.0]
    real_clock = time.perf_counter
    monkeypatch.setattr(time, "perf_counter", lambda: real_clock() + offset[0])

    def slow(accuracies):
        def measured(*args, **kwargs):
            offset[0] += 1000.0  # each diagnostic evaluation "takes" 1000 s
            return accuracies(*args, **kwargs)
        return measured

    monkeypatch.setattr(runner, "accuracies", slow(runner.accuracies))
    monkeypatch.setattr(measure, "accuracies", slow(measure.accuracies))
    data = load_digits_dataset(0, train_limit=64, test_limit=32)
    result = run_one(config, tmp_path / "run", dataset=data)
    growth = result["growths"][0]
    assert growth["accuracy"]["after_phase"] is not None  # the phase was measured
    for key in ("training_seconds", "phase_seconds", "growth_seconds"):
        assert result[key] < 1000.0, key
    assert growth["growth_seconds"] < 1000.0 and growth["phase_seconds"] < 1000.0
    assert max(result["epoch_seconds"]) < 1000.0
