"""Data for `simcore grow`: bundled digits, CIFAR pickles (and refusing crafted ones), batches."""

from __future__ import annotations

import json
import os
import pickle
import select
import struct
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch

from simcore.experiment.data import (
    RestrictedUnpickler,
    UnsafePickleError,
    augment_batch,
    iter_batches,
    load_cifar,
    load_dataset,
    load_digits_dataset,
)


def test_digits_split_is_fixed_by_seed_disjoint_and_stratified():
    a = load_digits_dataset(seed=0)
    b = load_digits_dataset(seed=0)
    c = load_digits_dataset(seed=1)
    assert a.train_images.shape[1:] == (3, 32, 32) and a.train_images.dtype == torch.uint8
    assert a.train_labels.shape[0] + a.test_labels.shape[0] == 1797
    assert torch.equal(a.test_images, b.test_images) and torch.equal(a.test_labels, b.test_labels)
    assert not torch.equal(a.test_labels, c.test_labels)
    # the three channels are copies of one grey image
    assert torch.equal(a.train_images[:, 0], a.train_images[:, 2])
    # no test image is also a training image
    train = {bytes(x.numpy()) for x in a.train_images}
    assert not any(bytes(x.numpy()) in train for x in a.test_images[:50])
    # stratified: every class holds about 25 % of its images in the test split
    for cls in range(10):
        n_test = int((a.test_labels == cls).sum())
        n_all = n_test + int((a.train_labels == cls).sum())
        assert abs(n_test / n_all - 0.25) < 0.02


def _write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=2))


def _cifar_batch(rng, n, label_key, classes, extra=None):
    batch = {b"batch_label": b"testing batch", label_key: [int(v) for v in
                                                           rng.integers(0, classes, n)],
             b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             b"filenames": [f"img_{i}.png".encode() for i in range(n)]}
    batch.update(extra or {})
    return batch


def _cifar10(root, rng, sizes=(3, 2, 2, 2, 2), test=4):
    folder = root / "cifar-10-batches-py"
    batches = [_cifar_batch(rng, n, b"labels", 10) for n in sizes]
    for i, batch in enumerate(batches, start=1):
        _write(folder / f"data_batch_{i}", batch)
    test_batch = _cifar_batch(rng, test, b"labels", 10)
    _write(folder / "test_batch", test_batch)
    return batches, test_batch


def test_cifar10_reads_the_real_layout_pixel_for_pixel(tmp_path):
    rng = np.random.default_rng(0)
    batches, test_batch = _cifar10(tmp_path, rng)
    data = load_cifar(tmp_path, "cifar10")
    expected = np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, 32, 32)
    assert data.num_classes == 10 and data.augment
    assert np.array_equal(data.train_images.numpy(), expected)
    assert data.train_labels.tolist() == sum((b[b"labels"] for b in batches), [])
    assert np.array_equal(data.test_images.numpy(), test_batch[b"data"].reshape(-1, 3, 32, 32))
    # row layout of the files: 1024 red, then 1024 green, then 1024 blue values
    assert data.train_images[0, 1, 0, 0] == batches[0][b"data"][0, 1024]
    # the dataset folder itself is accepted as root too
    again = load_cifar(tmp_path / "cifar-10-batches-py", "cifar10", train_limit=4)
    assert torch.equal(again.train_images, data.train_images[:4])


def test_cifar100_uses_the_fine_labels(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-100-python"
    train = _cifar_batch(rng, 5, b"fine_labels", 100, {b"coarse_labels": [0] * 5})
    test = _cifar_batch(rng, 3, b"fine_labels", 100, {b"coarse_labels": [1] * 3})
    _write(folder / "train", train)
    _write(folder / "test", test)
    data = load_dataset("cifar100", root=str(tmp_path))
    assert data.num_classes == 100
    assert data.train_labels.tolist() == train[b"fine_labels"]
    assert data.test_labels.tolist() == test[b"fine_labels"]


class _RunsCode:
    def __init__(self, sentinel):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


@pytest.mark.parametrize("where", ["top", "inside data"])
def test_a_crafted_pickle_is_refused_and_runs_nothing(tmp_path, where):
    rng = np.random.default_rng(2)
    _cifar10(tmp_path, rng)
    sentinel = tmp_path / "pwned"
    payload = _RunsCode(sentinel)
    if where == "inside data":
        payload = _cifar_batch(rng, 2, b"labels", 10, {b"data": payload})
    _write(tmp_path / "cifar-10-batches-py" / "data_batch_3", payload)
    with pytest.raises(UnsafePickleError, match=r"data_batch_3.*refused global '\w+\.system'"):
        load_cifar(tmp_path, "cifar10")
    assert not sentinel.exists()


def test_other_globals_are_refused_too(tmp_path):
    class Evaluates:
        def __reduce__(self):
            return (eval, ("1 + 1",))

    _write(tmp_path / "cifar-100-python" / "train", Evaluates())
    _write(tmp_path / "cifar-100-python" / "test", {})
    with pytest.raises(UnsafePickleError, match=r"refused global .\w+\.eval."):
        load_cifar(tmp_path, "cifar100")


def test_missing_files_say_where_to_put_them(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_cifar(tmp_path, "cifar10")
    message = str(info.value)
    assert str(tmp_path / "cifar-10-batches-py" / "data_batch_1") in message
    assert "cifar-10-python.tar.gz" in message and "extract" in message
    with pytest.raises(ValueError, match="--data-root"):
        load_dataset("cifar10", root=None)


@pytest.mark.parametrize("change, match", [
    ({b"data": np.zeros((2, 100), dtype=np.uint8)}, "shape"),
    ({b"labels": [0, 1, 2]}, "3 labels for 2 images"),
    ({b"labels": [0, 10]}, r"labels must lie in \[0, 10\)"),
    ({b"labels": np.array(3, dtype=np.uint8)}, r"test_batch: b'labels' must be a list of ints"),
])
def test_malformed_batches_are_rejected(tmp_path, change, match):
    rng = np.random.default_rng(3)
    _cifar10(tmp_path, rng)
    bad = _cifar_batch(rng, 2, b"labels", 10, change)
    _write(tmp_path / "cifar-10-batches-py" / "test_batch", bad)
    with pytest.raises(ValueError, match=match):
        load_cifar(tmp_path, "cifar10")


def test_augmentation_is_a_padded_crop_possibly_flipped():
    images = torch.arange(2 * 2 * 5 * 5, dtype=torch.float32).reshape(2, 2, 5, 5) + 1
    out = augment_batch(images, torch.Generator().manual_seed(4), padding=2)
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    for k in range(2):
        windows = [padded[k, :, i:i + 5, j:j + 5] for i in range(5) for j in range(5)]
        windows += [w.flip(-1) for w in windows]
        assert any(torch.equal(out[k], w) for w in windows)


def test_skipped_batches_resume_the_same_epoch_exactly():
    data = load_digits_dataset(0, train_limit=40, test_limit=8)
    data = type(data)(**{**data.__dict__, "augment": True})

    def epoch(skip):
        return list(iter_batches(data, "train", 8, generator=torch.Generator().manual_seed(9),
                                 skip=skip))

    full, tail = epoch(0), epoch(2)
    assert len(full) == 5 and len(tail) == 3
    for (x, y), (x2, y2) in zip(full[2:], tail, strict=True):
        assert torch.equal(x, x2) and torch.equal(y, y2)


# ---------------------------------------------------------------- forged NumPy state

def _text(value):
    data = value.encode("latin1")
    return b"X" + struct.pack("<I", len(data)) + data


def _raw(data):  # BINBYTES (Python 3) or BINSTRING (a Python 2 str, bytes under encoding="bytes")
    return b"B" + struct.pack("<I", len(data)) + data


def _py2_str(data):
    return b"T" + struct.pack("<I", len(data)) + data


def _int(value):
    return b"J" + struct.pack("<i", value)


def _array_opcodes(dtype_args, dtype_state, shape, raw, *, string=_text, module="numpy._core"):
    """Opcodes that leave ``_reconstruct(ndarray, (0,), 'b')`` with the given state on the stack.

    This is NumPy's own layout for an array at protocol 2, with every field chosen by hand,
    the way an attacker would write it.
    """
    name, align, copy = dtype_args
    dtype = (b"cnumpy\ndtype\n" + string(name) + (b"\x88" if align else b"\x89")
             + (b"\x88" if copy else b"\x89") + b"\x87R")
    version, endian, *nones, elsize, alignment, flags = dtype_state
    dtype += (b"(" + _int(version) + string(endian) + b"N" * len(nones) + _int(elsize)
              + _int(alignment) + _int(flags) + b"tb")
    dims = b"(" + b"".join(_int(n) for n in shape) + b"t"
    return (b"c" + module.encode() + b".multiarray\n_reconstruct\ncnumpy\nndarray\n"
            + _int(0) + b"\x85" + string("b") + b"\x87R"
            + b"(" + _int(1) + dims + dtype + b"\x89" + raw + b"tb")


def _batch_pickle(labels_opcodes, data_opcodes):
    return (b"\x80\x02}(" + _raw(b"data") + data_opcodes
            + _raw(b"labels") + labels_opcodes + b"u.")


_PLAIN_UINT8 = (3, "|", None, None, None, -1, -1, 0)


def _uint8_opcodes(values, **kwargs):
    values = np.asarray(values, dtype=np.uint8)
    return _array_opcodes(("u1", False, True), _PLAIN_UINT8, values.shape, _raw(values.tobytes()),
                          **kwargs)


def _load(blob):
    import io
    return RestrictedUnpickler(io.BytesIO(blob), encoding="bytes").load()


def test_hand_written_uint8_layouts_load_including_python2_strings():
    pixels = np.arange(2 * 3072, dtype=np.int64).reshape(2, 3072) % 256
    py3 = _load(b"\x80\x02" + _uint8_opcodes(pixels) + b".")
    assert py3.dtype == np.uint8 and np.array_equal(py3, pixels)
    # the original CIFAR files: Python 2 str fields (bytes here) and numpy.core
    py2 = _load(b"\x80\x02" + _array_opcodes(("u1", False, True), _PLAIN_UINT8, (2, 3072),
                                               _py2_str(pixels.astype(np.uint8).tobytes()),
                                               string=lambda t: _py2_str(t.encode()),
                                               module="numpy.core") + b".")
    assert type(py2) is np.ndarray and np.array_equal(py2, pixels) and py2.flags.writeable


def _cifar10_with_test_batch(root, seed, change):
    """A CIFAR-10 folder whose test batch has the entries of ``change``."""
    rng = np.random.default_rng(seed)
    _cifar10(root, rng)
    _write(root / "cifar-10-batches-py" / "test_batch",
           _cifar_batch(rng, 2, b"labels", 10, change))


_FORGED_OBJECT_ARRAY = _array_opcodes(("O8", False, True), (3, "|", None, None, None, -1, -1, 0),
                                      (2,), _raw(b"\x41" * 16))

@pytest.mark.slow  # long: see tests/conftest.py for the two tiers
@pytest.mark.parametrize("where", ["labels", "data"])
def test_a_forged_object_dtype_array_is_refused_without_crashing(tmp_path, where,
                                                                 loader_child):
    # an object dtype whose state clears its object flags, then an array of it whose raw
    # bytes would be read as object pointers: with the real NumPy callables this crashes
    rng = np.random.default_rng(5)
    _cifar10(tmp_path, rng)
    good_data = _uint8_opcodes(np.zeros((2, 3072)))
    good_labels = b"](" + _int(0) + _int(1) + b"e"
    blob = (_batch_pickle(_FORGED_OBJECT_ARRAY, good_data) if where == "labels"
            else _batch_pickle(good_labels, _FORGED_OBJECT_ARRAY))
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(blob)
    out = loader_child.load_cifar(tmp_path, timeout=120)
    assert out.startswith("REFUSED UnsafePickleError") and "data_batch_1" in out
    assert "refused dtype('O8', False, True)" in out


@pytest.mark.parametrize("dtype_args, state, shape, raw, match", [
    (("f8", False, True), (3, "<", None, None, None, -1, -1, 0), (2,), b"\0" * 16,
     r"refused dtype\('f8'"),
    (("u1", False, True), (3, "|", None, None, None, -1, -1, 63), (2,), b"\0" * 2,
     "refused dtype state"),
    (("u1", False, True), (3, "<", None, None, None, 8, 8, 0), (2,), b"\0" * 2,
     "refused dtype state"),
    (("u1", False, True), _PLAIN_UINT8, (4,), b"\0" * 2, "expected 4 raw bytes"),
    (("u1", False, True), _PLAIN_UINT8, (2, 3), b"\0" * 7, "expected 6 raw bytes"),
])
def test_non_uint8_or_inconsistent_arrays_are_refused(dtype_args, state, shape, raw, match):
    blob = b"\x80\x02" + _array_opcodes(dtype_args, state, shape, _raw(raw)) + b"."
    with pytest.raises(UnsafePickleError, match=match):
        _load(blob)


@pytest.mark.parametrize("array", [np.zeros((2, 3072)), np.array([None, 1], dtype=object),
                                   np.zeros((2, 3072), dtype=np.float32)])
def test_real_non_uint8_arrays_in_a_batch_are_refused(tmp_path, array):
    _cifar10_with_test_batch(tmp_path, seed=6, change={b"data": array})
    with pytest.raises(UnsafePickleError, match=r"test_batch.*refused"):
        load_cifar(tmp_path, "cifar10")


def test_stand_ins_never_leak_out_of_a_load():
    bare_dtype = b"\x80\x02cnumpy\ndtype\n" + _text("u1") + b"\x89\x88\x87R."
    with pytest.raises(UnsafePickleError, match="bare dtype"):
        _load(bare_dtype)
    no_state = b"\x80\x02cnumpy._core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + \
        _int(0) + b"\x85" + _text("b") + b"\x87R."
    with pytest.raises(UnsafePickleError, match="never given its data"):
        _load(no_state)
    with pytest.raises(UnsafePickleError, match="ndarray"):
        _load(b"\x80\x02cnumpy\nndarray\n)\x81.")  # NEWOBJ of the marker


# ---------------------------------------------------------------- bounded loading

_LOADER_CHILD = """
import json, sys
from simcore.experiment.cifar import restricted_load
from simcore.experiment.data import load_cifar

print(json.dumps("READY"), flush=True)
for line in sys.stdin:  # one request a line: a function and a path, tab-separated
    function, path = line.rstrip("\\n").split("\\t")
    try:
        load_cifar(path, "cifar10") if function == "load_cifar" else restricted_load(path)
    except ValueError as err:
        reply = f"REFUSED {type(err).__name__} {str(err)[:2000]}"
    else:
        reply = "LOADED"
    print(json.dumps(reply), flush=True)
"""


class _LoaderChild:
    """The CIFAR loader in a child process, so that a loader that crashes the interpreter or
    hangs fails the test that made it, not the session.

    One child serves the module's requests (starting one costs seconds, a load milliseconds;
    the loader keeps no state between loads); after a crash or a hang the next request starts
    a fresh one. ``timeout`` counts from the request, after the child has started.
    """

    def __init__(self):
        self._process = None
        self._stderr = None

    def _start(self):
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self._process = subprocess.Popen([sys.executable, "-c", _LOADER_CHILD], text=True,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=self._stderr)
        assert self._reply("starting", timeout=120) == "READY"

    def _reply(self, doing, timeout):
        ready, _, _ = select.select([self._process.stdout], [], [], timeout)
        reply = self._process.stdout.readline() if ready else ""
        if not reply:  # no answer in time, or the child died
            self._process.kill()
            returncode = self._process.wait()
            self._stderr.seek(0)
            stderr = self._stderr.read()[-2000:]
            self.close()
            why = f"took more than {timeout} s" if not ready else f"exited with {returncode}"
            pytest.fail(f"the loader child {why} {doing}: {stderr}")
        return json.loads(reply)

    def _request(self, function, path, timeout):
        if self._process is None or self._process.poll() is not None:
            self._start()
        self._process.stdin.write(f"{function}\t{path}\n")
        self._process.stdin.flush()
        return self._reply(f"on {function}({path})", timeout)

    def load_cifar(self, root, timeout=20):
        """``load_cifar(root, "cifar10")``: ``"LOADED"`` or ``"REFUSED <error type> <message>"``."""
        return self._request("load_cifar", root, timeout)

    def restricted_load(self, path, timeout=60):
        """``restricted_load(path)``, answered as :meth:`load_cifar` answers."""
        return self._request("restricted_load", path, timeout)

    def close(self):
        if self._process is not None:
            self._process.stdin.close()  # the child's loop ends
            self._process.wait(timeout=60)
            self._process.stdout.close()
            self._stderr.close()
            self._process = None


@pytest.fixture(scope="module")
def loader_child():
    child = _LoaderChild()
    yield child
    child.close()


def _shared_tuples(depth, width=2):
    """``depth`` levels of a tuple that holds ``width`` references to the level below it."""
    level = ()
    for _ in range(depth):
        level = (level,) * width
    return level


def test_a_tiny_file_of_deeply_shared_tuples_is_refused_at_once(tmp_path, loader_child):
    # 282 bytes that a walk without a memo expands to 2**40 nodes (the loader hung forever)
    _cifar10(tmp_path, np.random.default_rng(7))
    bomb = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    _write(bomb, {b"data": _shared_tuples(40), b"labels": []})
    assert bomb.stat().st_size < 300
    out = loader_child.load_cifar(tmp_path)
    assert out.startswith("REFUSED UnsafePickleError") and "data_batch_2" in out
    assert "nested deeper than" in out


def test_shared_objects_are_walked_once(tmp_path, loader_child):
    # shallow enough for a CIFAR batch, but 10**8 nodes when every reference is walked
    rng = np.random.default_rng(8)
    batches, _ = _cifar10(tmp_path, rng)
    shared = _shared_tuples(2, width=10_000)
    _write(tmp_path / "cifar-10-batches-py" / "data_batch_1", {**batches[0], b"extra": shared})
    assert loader_child.load_cifar(tmp_path) == "LOADED"
    from simcore.experiment.cifar import restricted_load
    loaded = restricted_load(tmp_path / "cifar-10-batches-py" / "data_batch_1")
    assert loaded[b"extra"] == shared and loaded[b"extra"][0] is loaded[b"extra"][1]


def _nested_lists(depth):
    return b"]" * depth + b"a" * (depth - 1)


@pytest.mark.parametrize("where", ["labels", "dtype state", "array shape"])
def test_a_pickle_nested_200k_deep_is_refused_without_recursion_error(tmp_path, where):
    rng = np.random.default_rng(9)
    _cifar10(tmp_path, rng)
    deep = _nested_lists(200_000)
    good_data = _uint8_opcodes(np.zeros((2, 3072)))
    if where == "labels":
        blob = _batch_pickle(deep, good_data)
    elif where == "dtype state":  # the refusal message must not print it whole either
        dtype = b"cnumpy\ndtype\n" + _text("u1") + b"\x89\x88\x87R" + deep + b"b"
        blob = _batch_pickle(b"](" + _int(0) + _int(1) + b"e", dtype)
    else:
        array = (b"cnumpy._core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + _int(0) + b"\x85"
                 + _text("b") + b"\x87R(" + _int(1) + deep + b"N\x89" + _raw(b"") + b"tb")
        blob = _batch_pickle(b"](" + _int(0) + _int(1) + b"e", array)
    (tmp_path / "cifar-10-batches-py" / "data_batch_4").write_bytes(blob)
    with pytest.raises(UnsafePickleError, match="data_batch_4") as info:
        load_cifar(tmp_path, "cifar10")
    assert len(str(info.value)) < 1000


def test_more_nodes_than_a_cifar_batch_holds_are_refused(tmp_path):
    from simcore.experiment import cifar

    _cifar10_with_test_batch(tmp_path, seed=10, change={b"extra": [0] * (cifar.MAX_NODES + 1)})
    with pytest.raises(UnsafePickleError, match=r"test_batch.*more than \d+ objects"):
        load_cifar(tmp_path, "cifar10")


@pytest.mark.parametrize("labels", [[2**70, 0], [0, -2**70], [0, 2**63]])
def test_labels_too_large_for_int64_are_a_clear_error(tmp_path, labels):
    _cifar10_with_test_batch(tmp_path, seed=11, change={b"labels": labels})
    with pytest.raises(ValueError, match=r"test_batch: labels must lie in \[0, 10\)"):
        load_cifar(tmp_path, "cifar10")


def test_a_batch_with_mixed_key_types_names_its_keys(tmp_path):
    rng = np.random.default_rng(12)
    _cifar10(tmp_path, rng)
    batch = _cifar_batch(rng, 2, b"labels", 10)
    batch[7] = batch.pop(b"labels")
    _write(tmp_path / "cifar-10-batches-py" / "test_batch", batch)
    with pytest.raises(ValueError, match=r"test_batch: batch has no b'labels' entry \(keys: .*7"):
        load_cifar(tmp_path, "cifar10")


def test_refusals_are_value_errors():
    # what `simcore grow` reports as its one-line error (simcore/experiment/cli.py)
    assert issubclass(UnsafePickleError, ValueError)
    assert issubclass(UnsafePickleError, pickle.UnpicklingError)


# one subprocess each (about 5 s): the loader's own tests cover every refusal in process, so
# the fast tier keeps one end-to-end case
@pytest.mark.parametrize("crafted", [
    "shared tuples",
    *(pytest.param(c, marks=pytest.mark.slow) for c in ("runs code", "huge label", "bad memo")),
])
def test_simcore_grow_refuses_a_crafted_file_in_one_line(tmp_path, crafted):
    # "runs code" raises UnsafePickleError; "bad memo" (a reference to an entry never stored,
    # which the opcode check lets through) pickle's own UnpicklingError
    rng = np.random.default_rng(13)
    _cifar10(tmp_path, rng)
    target = tmp_path / "cifar-10-batches-py" / "data_batch_5"
    if crafted == "bad memo":
        target.write_bytes(b"\x80\x02h\x05.")  # BINGET 5 on an empty memo
    else:
        _write(target, {"runs code": _RunsCode(tmp_path / "pwned"),
                        "shared tuples": {b"data": _shared_tuples(40), b"labels": []},
                        "huge label": _cifar_batch(rng, 2, b"labels", 10,
                                                   {b"labels": [2**70, 0]}),
                        }[crafted])
    command = [sys.executable, "-m", "simcore", "grow", "--dataset", "cifar10",
               "--data-root", str(tmp_path), "--method", "random", "--width", "4",
               "--epochs", "1", "--train-limit", "8", "--test-limit", "4", "--batch-size", "4",
               "--no-figures", "--quiet", "--threads", "1", "--jobs", "1",
               "--out", str(tmp_path / "out")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-2000:]
    assert lines[0].startswith("simcore grow: error: ") and "data_batch_5" in lines[0]
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("through", ["tuples", "tuples between array objects"])
def test_a_dict_keyed_by_a_deep_tuple_is_refused_before_unpickling_crashes(tmp_path, through,
                                                                          loader_child):
    # hashing a tuple nested a million deep recurses in C without a limit (the process died)
    deep = b")" + b"\x85" * 1_000_000
    if through == "tuples between array objects":  # each OBJ pops up to its mark, not below
        dtype = b"(cnumpy\ndtype\n" + _text("u1") + b"\x89\x88o0"
        deep = b")" + (b"\x85" * 3 + dtype) * 250_000 + b"\x85"
    bomb = tmp_path / "test_batch"
    bomb.write_bytes(b"\x80\x02}" + deep + b"K\x01s.")
    out = loader_child.restricted_load(bomb)
    assert out.startswith("REFUSED UnsafePickleError") and "test_batch" in out
    assert "nested deeper than" in out
