"""`simcore grow` loses nothing: a diverged run stops with its last good checkpoint, one output
folder takes one run at a time, and a failed checkpoint write leaves the previous one whole."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from simcore.adapters.torch import save_checkpoint, vgg16

from simcore.experiment import preset, run_experiment, run_one
from simcore.experiment.lock import LOCK_NAME, FolderInUse, OutputLock

TINY = preset("quick").replace(
    width=4, epochs=2, grow_every=1, max_growths=1, batch_size=32, growth_batches=1,
    firefly_candidates=4, train_limit=64, test_limit=32, phase_steps=2, method="random")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_phase_that_blows_the_weights_up_stops_the_run_with_the_last_good_checkpoint(
        tmp_path):
    # An absolute step of 1e300 overflows the grown float32 weights: the run must stop before
    # writing that state (the growth ends epoch 1, whose checkpoint is never written) and write
    # no result.
    config = TINY.replace(terms="both", phase_step="absolute", phase_lr=1e300)
    with pytest.raises(FloatingPointError, match="non-finite.*--phase-lr"):
        run_one(config, tmp_path)
    assert not (tmp_path / "result.json").exists()
    assert not (tmp_path / "checkpoint.pt").exists()  # epoch 1 ended in the growth: no save


def test_a_phase_that_breaks_only_the_batchnorm_statistics_stops_the_run_too(tmp_path):
    # `--phase-step absolute --phase-lr 1e30` (issue 14, item 8): the weights stay finite and
    # so does every training loss (BatchNorm normalises each batch), but the running variances
    # overflow; the run exited 0 with a broken model and chance accuracy. Now the end of
    # epoch 2 refuses to save it, and the epoch-1 checkpoint (right after the growth) is kept.
    config = TINY.replace(terms="both", phase_step="absolute", phase_lr=1e30, phase_steps=20)
    with pytest.raises(FloatingPointError, match=r"running_var.* non-finite in epoch 2"):
        run_one(config, tmp_path)
    assert not (tmp_path / "result.json").exists()
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert saved["extra"]["state"]["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in saved["model"].values()
               if t.is_floating_point())


def test_a_loss_that_becomes_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    config = TINY.replace(terms="none", epochs=3, max_growths=0)
    original = torch.nn.CrossEntropyLoss.forward
    calls = {"count": 0}

    def diverging(self, logits, targets):
        calls["count"] += 1  # two batches per epoch: the first batch of epoch 2 diverges
        loss = original(self, logits, targets)
        return loss * float("nan") if calls["count"] == 3 else loss

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.nn.CrossEntropyLoss, "forward", diverging)
        with pytest.raises(FloatingPointError, match="epoch 2.*checkpoint of the last"):
            run_one(config, tmp_path)
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert saved["extra"]["state"]["epoch"] == 1  # the end of epoch 1, not the NaN state
    assert all(torch.isfinite(t).all() for t in saved["model"].values()
               if t.is_floating_point())


def test_the_command_line_reports_a_diverged_run_in_one_line(tmp_path):
    command = [sys.executable, "-m", "simcore", "grow", "--method", "random", "--similarity",
               "on", "--width", "4", "--epochs", "2", "--grow-every", "1", "--max-growths", "1",
               "--train-limit", "64", "--test-limit", "16", "--batch-size", "32",
               "--phase-step", "absolute", "--phase-lr", "1e300", "--seeds", "0",
               "--no-figures", "--quiet", "--jobs", "1", "--out", str(tmp_path / "out")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("simcore grow: error:")
    assert "non-finite" in lines[0] and "Traceback" not in done.stderr


def test_one_output_folder_takes_one_run_at_a_time(tmp_path):
    with OutputLock(tmp_path):
        with pytest.raises(FolderInUse, match="in use by another simcore grow"):
            run_experiment(TINY, methods=["random"], terms=["none"], seeds=[0],
                           out_dir=tmp_path, figures=False, echo=None)
    assert not (tmp_path / "results.json").exists()
    assert not (tmp_path / LOCK_NAME).exists()  # released by the holder


_HOLDS_THE_LOCK_BEFORE_ITS_PID = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_CREAT | os.O_RDWR, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(60)
"""


def test_a_run_that_has_not_yet_written_its_pid_still_holds_the_folder(tmp_path):
    # Two runs started together: the first has made the lock but not yet written its process
    # id. The lock was then read as stale, taken over, and both runs went on into one folder.
    holder = subprocess.Popen([sys.executable, "-c", _HOLDS_THE_LOCK_BEFORE_ITS_PID,
                               str(tmp_path / LOCK_NAME)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(FolderInUse, match=r"in use by another simcore grow \(process "
                                              r"starting\)"):
            OutputLock(tmp_path).__enter__()
    finally:
        holder.kill()
        holder.wait()
    with OutputLock(tmp_path):  # its process gone, the lock is free at once
        assert (tmp_path / LOCK_NAME).read_text() == str(os.getpid())


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_NAME).write_text(str(dead.pid))
    outcome = run_experiment(TINY, methods=["random"], terms=["none"], seeds=[0],
                             out_dir=tmp_path, figures=False, echo=None)
    assert len(outcome["results"]) == 1 and (tmp_path / "results.json").exists()
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_failed_checkpoint_write_keeps_the_previous_one_and_leaves_no_temporary(
        tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    model = vgg16(width=4)
    save_checkpoint(path, model)
    before = path.read_bytes()

    def disk_full(obj, target, *args, **kwargs):
        with open(target, "wb") as handle:
            handle.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="could not write checkpoint .*No space left.*unchanged"):
        save_checkpoint(path, model)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


_FULL_DISK = """
import resource, signal, sys
from simcore.experiment import run_experiment
from test_experiment_reliability import TINY
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (200, 200))  # no file may grow past 200 bytes
try:
    run_experiment(TINY, methods=["random"], terms=["none"], seeds=[0], out_dir=sys.argv[1],
                   figures=False, echo=None)
except OSError as err:
    print("FAILED", err)
"""


def test_a_full_disk_while_rewriting_the_results_keeps_every_file_whole(tmp_path):
    # results.json was rewritten in place: a full disk left invalid JSON where a valid file was
    run_experiment(TINY, methods=["random"], terms=["none"], seeds=[0], out_dir=tmp_path,
                   figures=False, echo=None)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    # The run is finished: a second time only rewrites the results, each larger than 200 bytes.
    child = subprocess.run([sys.executable, "-c", _FULL_DISK, str(tmp_path)], timeout=120,
                           capture_output=True, text=True, cwd=Path(__file__).parent)
    assert child.stdout.startswith("FAILED") and "File too large" in child.stdout, child.stderr
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before  # every file as it was, no temporary left beside them


def test_without_a_terminal_the_runs_report_progress_in_plain_lines(tmp_path, monkeypatch):
    from simcore.experiment import compare

    monkeypatch.setattr(compare, "PROGRESS_LINE_SECONDS", 0.0)  # a line for every epoch
    said: list[str] = []
    run_experiment(TINY, methods=["random"], terms=["none"], seeds=[0, 1], out_dir=tmp_path,
                   figures=False, echo=said.append, progress=False)
    ticks = [line for line in said if "epochs of all runs done" in line]
    assert ticks[0].strip().startswith("... 1/4 epochs") and "4/4 epochs" in ticks[-1]
    first_result = next(i for i, line in enumerate(said) if line.startswith("[1/2]"))
    assert said.index(ticks[0]) < first_result  # progress shows before the first run ends
