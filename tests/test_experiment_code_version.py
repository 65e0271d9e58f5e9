"""`simcore grow` reuses a run only when the same settings AND the same code made it.

The code is told by :func:`simcore.experiment.fingerprint.code_fingerprint`, a hash of the
installed source. "Other code" is simulated by pointing the fingerprint at a small package in a
temporary folder (:func:`other_code`), never by editing the installed package.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from simcore.adapters.torch import save_checkpoint, vgg16

from simcore.experiment import Hooks, fingerprint, preset, run_experiment, run_one
from simcore.experiment.cli import main as grow_main
from simcore.experiment.data import load_digits_dataset
from simcore.experiment.fingerprint import code_fingerprint, package_roots, source_fingerprint
from simcore.experiment.run_common import RunState, finished_result
from simcore.experiment.runner import run_status

# 2 epochs of a width-4 VGG16 on 64 digits, no growth: about a second per run.
TINY = preset("quick").replace(
    width=4, epochs=2, grow_every=1, max_growths=0, batch_size=32, growth_batches=1,
    firefly_candidates=4, train_limit=64, test_limit=32, method="random", terms="none")
OLD = "0123456789ab"  # a fingerprint of no real code


pytestmark = pytest.mark.usefixtures("torch_one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def data():
    return load_digits_dataset(0, train_limit=64, test_limit=32)


@contextlib.contextmanager
def other_code(folder: Path):
    """``code_fingerprint()`` as if the installed simcore were another version (a package in
    ``folder``); yields that version's fingerprint."""
    package = folder / "other_simcore"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text("LOSS_KERNEL = 'the version before the change'\n")
    real = fingerprint.package_roots
    fingerprint.package_roots = lambda: {"simcore": package}
    fingerprint.code_fingerprint.cache_clear()
    try:
        yield code_fingerprint()
    finally:
        fingerprint.package_roots = real
        fingerprint.code_fingerprint.cache_clear()


def _package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


SOURCE = {"__init__.py": "from .loss import loss\n", "loss.py": "def loss(x):\n    return x\n",
          "growth/__init__.py": "", "growth/ssd.py": "STEPS = 3\n"}


# --- the fingerprint ------------------------------------------------------------------------

def test_the_fingerprint_is_stable_and_changes_with_any_source_file(tmp_path):
    first = source_fingerprint({"simcore": _package(tmp_path / "a", SOURCE)})
    # the same source elsewhere, written in another order, with caches, data files, a stray
    # non-package folder and Windows line endings: the same fingerprint
    copy = _package(tmp_path / "b" / "site-packages" / "simcore",
                    dict(reversed(list(SOURCE.items()))))
    (copy / "loss.py").write_bytes(b"def loss(x):\r\n    return x\r\n")
    _package(copy, {"__pycache__/loss.cpython-312.pyc": "bytes", "py.typed": "",
                    "notes/scratch.py": "x = 1\n"})
    assert source_fingerprint({"simcore": copy}) == first
    assert len(first) == 12 and int(first, 16) >= 0
    for changed in ({"loss.py": "def loss(x):\n    return 2 * x\n"},  # the loss kernel
                    {"growth/ssd.py": "STEPS = 3  # a comment\n"},      # docs-only: changes too
                    {"growth/extra.py": ""}):                           # a new module
        other = _package(tmp_path / f"changed{len(list(tmp_path.iterdir()))}",
                         {**SOURCE, **changed})
        assert source_fingerprint({"simcore": other}) != first, changed
    moved = {("growth/loss.py" if k == "loss.py" else k): v for k, v in SOURCE.items()}
    assert source_fingerprint({"simcore": _package(tmp_path / "moved", moved)}) != first
    with pytest.raises(ValueError, match="not a package folder"):
        source_fingerprint({"simcore": tmp_path})


def test_an_editable_and_a_wheel_layout_of_the_same_source_agree(tmp_path):
    # editable: adapters/ beside simcore/; a wheel: simcore/adapters/ inside simcore/
    adapters = {"__init__.py": "", "torch.py": "GROW = True\n"}
    editable = {"simcore": _package(tmp_path / "repo" / "simcore", SOURCE),
                "simcore/adapters": _package(tmp_path / "repo" / "adapters", adapters)}
    wheel_root = _package(tmp_path / "wheel" / "simcore", SOURCE)
    wheel = {"simcore": wheel_root,
             "simcore/adapters": _package(wheel_root / "adapters", adapters)}
    assert source_fingerprint(editable) == source_fingerprint(wheel)
    assert source_fingerprint(editable) != source_fingerprint({"simcore": editable["simcore"]})


def test_the_installed_fingerprint_covers_the_adapters_and_the_reference():
    roots = package_roots()
    assert set(roots) == {"simcore", "simcore/adapters", "simcore/reference"}
    assert (roots["simcore/adapters"] / "torch" / "__init__.py").is_file()
    assert code_fingerprint() == source_fingerprint(roots)
    assert code_fingerprint() is code_fingerprint()  # computed once per process


# --- the PyTorch runner ---------------------------------------------------------------------

def test_a_finished_run_of_other_code_is_run_again_and_kept_beside(tmp_path, data):
    run_dir = tmp_path / "run"
    with other_code(tmp_path) as old:
        first = run_one(TINY, run_dir, dataset=data)
        assert first["code"] == old and run_status(TINY, run_dir) == ("reused", TINY.epochs)
    assert run_status(TINY, run_dir) == ("code_changed", 0)
    again = run_one(TINY, run_dir, dataset=data)
    assert again["code"] == code_fingerprint() != old  # trained by this code
    assert again["key"] == first["key"]  # results stay comparable by settings
    assert json.loads((run_dir / f"result.code-{old}.json").read_text()) == first
    saved = torch.load(run_dir / f"checkpoint.code-{old}.pt", weights_only=True)
    assert saved["extra"]["code"] == old  # the old final model stays too (its Grad-CAM)
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["extra"]["code"] == (
        code_fingerprint())
    assert run_status(TINY, run_dir) == ("reused", TINY.epochs)
    assert run_one(TINY, run_dir, dataset=data) == again


def test_other_codes_runs_are_reused_when_asked(tmp_path, data):
    run_dir = tmp_path / "run"
    with other_code(tmp_path):
        first = run_one(TINY, run_dir, dataset=data)
    assert run_status(TINY, run_dir, reuse_other_code=True) == ("reused_other_code",
                                                                TINY.epochs)
    assert run_one(TINY, run_dir, dataset=data, reuse_other_code=True) == first
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint.pt", "result.json"]


def test_a_result_written_before_fingerprints_is_run_again(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    unversioned = {"key": TINY.training_key(), "final_accuracy": 12.5}  # no "code"
    (run_dir / "result.json").write_text(json.dumps(unversioned))
    assert run_status(TINY, run_dir) == ("code_changed", 0)
    assert finished_result(TINY, run_dir, resume=True, reuse_other_code=True) == unversioned
    assert finished_result(TINY, run_dir, resume=True) is None  # what run_one then trains
    assert json.loads((run_dir / "result.code-unknown.json").read_text()) == unversioned
    assert not (run_dir / "result.json").exists()
    # a result of other settings is still refused, whatever its code
    (run_dir / "result.json").write_text(json.dumps({"key": TINY.replace(lr=1.0).training_key(),
                                                     "code": OLD}))
    with pytest.raises(ValueError, match=r"other settings \(lr: 1.0 -> 0.05\)"):
        finished_result(TINY, run_dir, resume=True)


def test_a_checkpoint_written_before_fingerprints_is_not_resumed(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_checkpoint(run_dir / "checkpoint.pt", vgg16(width=4),
                    extra={"key": TINY.training_key(), "state": RunState(epoch=1).to_extra()})
    assert run_status(TINY, run_dir) == ("code_changed", 0)
    assert run_status(TINY, run_dir, reuse_other_code=True) == ("resumed_other_code", 1)


def test_a_checkpoint_of_other_code_starts_over_unless_asked(tmp_path, data):
    config = TINY.replace(epochs=3)

    def stop_after_epoch_0(epoch, record):
        if epoch == 0:
            raise KeyboardInterrupt

    interrupted = tmp_path / "interrupted"
    with other_code(tmp_path) as old, pytest.raises(KeyboardInterrupt):
        run_one(config, interrupted, dataset=data, hooks=Hooks(on_epoch_end=stop_after_epoch_0))
    asked = tmp_path / "asked"
    shutil.copytree(interrupted, asked)

    def trained(run_dir, **kwargs):
        epochs: list[int] = []
        result = run_one(config, run_dir, dataset=data,
                         hooks=Hooks(on_epoch_end=lambda epoch, _: epochs.append(epoch)),
                         **kwargs)
        return epochs, result

    assert run_status(config, interrupted) == ("code_changed", 0)
    epochs, result = trained(interrupted)
    assert epochs == [0, 1, 2] and result["resumed_from_code"] == []  # from the start
    assert (interrupted / f"checkpoint.code-{old}.pt").exists()

    assert run_status(config, asked, reuse_other_code=True) == ("resumed_other_code", 1)
    epochs, result = trained(asked, reuse_other_code=True)
    assert epochs == [1, 2]  # resumed where the other code stopped, and the result says so
    assert result["code"] == code_fingerprint() and result["resumed_from_code"] == [old]
    assert not list(asked.glob("*.code-*"))


# --- simcore grow, the JAX runner's status, phase_strength ----------------------------------

def test_the_plan_line_and_the_table_count_the_runs_trained_again(tmp_path, data):
    with other_code(tmp_path) as old:
        run_experiment(TINY, methods=["random"], terms=["none"], seeds=[0], out_dir=tmp_path,
                       figures=False, echo=None)
    lines: list[str] = []
    outcome = run_experiment(TINY, methods=["random"], terms=["none"], seeds=[0, 1],
                             out_dir=tmp_path, figures=False, echo=lines.append)
    assert outcome["statuses"] == ["code_changed", "new"]
    assert "1 run(s) in" in lines[0] and "written by other code" in lines[0]
    assert "seed0: accuracy" in "\n".join(lines) and "trained again, the code changed" in (
        "\n".join(lines))
    assert (f"1 of 2 run(s) trained again because the code changed since their earlier runs "
            f"(this code: {code_fingerprint()}") in outcome["table"]
    assert (tmp_path / "runs" / TINY.label / f"result.code-{old}.json").exists()

    with other_code(tmp_path):  # from the older code's side, both runs are now other code's
        lines.clear()
        outcome = run_experiment(TINY, methods=["random"], terms=["none"], seeds=[0, 1],
                                 out_dir=tmp_path, figures=False, echo=lines.append,
                                 reuse_other_code=True)
    assert outcome["statuses"] == ["reused_other_code"] * 2
    assert "2 run(s) finished earlier" in lines[0] and "--reuse-runs-from-other-code" in lines[0]
    assert "reused from an earlier run of other code" in "\n".join(lines)
    assert "2 of 2 run(s) reused or resumed from other code" in outcome["table"]
    with pytest.raises(ValueError, match="--fresh discards"):
        run_experiment(TINY, methods=["random"], terms=["none"], seeds=[0], out_dir=tmp_path,
                       fresh=True, reuse_other_code=True)


def test_the_command_line_flag_reaches_the_runs(monkeypatch, capsys):
    from simcore.experiment import compare

    asked = []

    def fake_run_experiment(*args, reuse_other_code, **kwargs):
        asked.append(reuse_other_code)
        return {"table": "a table\n1 of 1 run(s) reused or resumed from other code", "files": {},
                "conclusion": ""}

    monkeypatch.setattr(compare, "run_experiment", fake_run_experiment)
    assert grow_main(["--seeds", "0", "--quiet", "--jobs", "1"]) == 0
    assert grow_main(["--seeds", "0", "--quiet", "--jobs", "1",
                      "--reuse-runs-from-other-code"]) == 0
    assert asked == [False, True]  # safe by default
    assert "reused or resumed from other code" in capsys.readouterr().out


def test_the_jax_runners_status_and_reuse_follow_the_code(tmp_path):
    from simcore.experiment import jax_runner

    config = TINY.replace(framework="jax")
    result = {"key": config.training_key(), "code": OLD, "final_accuracy": 50.0}
    (tmp_path / "result.json").write_text(json.dumps(result))
    assert jax_runner.run_status(config, tmp_path) == ("code_changed", 0)
    assert jax_runner.run_status(config, tmp_path, reuse_other_code=True) == (
        "reused_other_code", config.epochs)
    assert jax_runner.run_one(config, tmp_path, reuse_other_code=True) == result
    (tmp_path / "result.json").write_text(json.dumps({**result, "code": code_fingerprint()}))
    assert jax_runner.run_status(config, tmp_path) == ("reused", config.epochs)


def _phase_strength():
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "phase_strength.py"
    spec = importlib.util.spec_from_file_location("phase_strength", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_phase_strength_sweep_says_when_it_reuses_other_codes_runs(tmp_path, monkeypatch,
                                                                        capsys):
    benchmark = _phase_strength()
    # one growth (the sweep reads each phase), Firefly as the sweep has it, two seeds (a CI)
    monkeypatch.setattr(benchmark, "preset", lambda _name: TINY.replace(max_growths=1))
    argv = ["--lr", "0.01", "--seeds", "0", "1", "--jobs", "1", "--out", str(tmp_path)]
    with other_code(tmp_path / "code"):
        benchmark.main(argv)
    capsys.readouterr()
    benchmark.main([*argv, "--reuse-runs-from-other-code"])
    out = capsys.readouterr().out
    assert "0 of 4 runs reused from earlier (same code)" in out
    assert "4 of 4 run(s) reused or resumed from other code" in out
