"""A pickle reader for the CIFAR files that runs nothing: :func:`restricted_load`.

CIFAR files are Python pickles, and unpickling can run arbitrary code. They are
read with :class:`RestrictedUnpickler`, which hands the pickle no real callable:
the few globals the files name (NumPy's dtype/array reconstruction, latin-1
``_codecs.encode``) resolve to checked stand-ins that accept only ``uint8``
arrays, and every other global is refused before anything is called, so a
crafted file raises :class:`UnsafePickleError` and runs nothing.
:func:`simcore.experiment.data.load_cifar` reads the batches with it.

Reading is bounded too: the opcodes are checked before unpickling
(:func:`check_opcodes`), the loaded objects are walked without recursion, each
shared object once, and a file holding more opcodes or objects
(:data:`MAX_OPCODES`, :data:`MAX_NODES`) or deeper nesting (:data:`MAX_DEPTH`)
than a CIFAR batch is refused, so a small crafted file can neither hang nor
crash the reader.
"""

from __future__ import annotations

import codecs
import io
import math
import pickle
import pickletools
import reprlib
from pathlib import Path
from typing import Any, ClassVar, Literal, NoReturn

import numpy as np

__all__ = ["MAX_DEPTH", "MAX_NODES", "MAX_OPCODES", "RestrictedUnpickler", "UnsafePickleError",
           "check_opcodes", "restricted_load"]

#: The most images one CIFAR file holds (CIFAR-100's ``train``; a CIFAR-10 batch holds 10000).
_LARGEST_FILE_IMAGES = 50_000
#: Objects a loaded file may hold (each shared one counted once): a CIFAR batch is a dict of a
#: few keys, one uint8 array and up to three lists with one entry per image (labels, coarse
#: labels, filenames).
MAX_NODES = 4 * _LARGEST_FILE_IMAGES + 256
#: Containers nested in one another: a CIFAR batch is a dict of lists (two levels).
MAX_DEPTH = 4
#: Pickle opcodes a file may hold: Python 3 writes each bytes object into a protocol-2 pickle
#: as a ``_codecs.encode`` call of about seven opcodes (a CIFAR-100 file: 500000 in all).
MAX_OPCODES = 8 * MAX_NODES


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """A pickle asked for a global, dtype or array state that the restricted unpickler refuses.

    Also a :class:`ValueError`: a refused file is bad input, reported like any other
    (``simcore grow`` prints its one-line error for ``ValueError``).
    """


# error messages quote attacker-chosen values: never more than a line of them, and never by a
# walk that follows every reference (a shared or deeply nested value would hang or recurse)
_BRIEF = reprlib.Repr()
_BRIEF.maxlevel, _BRIEF.maxstring, _BRIEF.maxother = 2, 60, 60
_BRIEF.maxtuple = _BRIEF.maxlist = _BRIEF.maxdict = _BRIEF.maxset = 8


def _brief(value: Any) -> str:
    """A short ``repr`` of ``value`` for an error message, whatever its size or nesting."""
    return _BRIEF.repr(value)


def _latin1_encode(text: Any, encoding: Any = "utf-8", errors: Any = "strict") -> bytes:
    """``_codecs.encode`` as Python 3 protocol-2 pickles use it for bytes: latin-1 only."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise UnsafePickleError(
            f"refused _codecs.encode({type(text).__name__}, {_brief(encoding)}): only latin-1 text "
            f"(how Python 3 writes bytes into a protocol-2 pickle) is allowed"
        )
    return codecs.encode(text, "latin1")


# The real ``np.dtype`` / ``_reconstruct`` must never reach a pickle: with them a
# crafted file can build an object dtype stripped of its object flags and then an
# array whose raw bytes are read as object pointers (a crash, and a known route to
# code execution). The pickle only ever sees the inert stand-ins below; they
# accept exactly what NumPy writes for a ``uint8`` array, and the loader turns
# them into real arrays built from the raw bytes alone.

_UINT8_DTYPE_STATE = np.dtype("u1").__reduce__()[2]  # (3, '|', None, None, None, -1, -1, 0)


def _text(value: Any) -> Any:
    """Python 2 ``str`` arrives as ``bytes`` under ``encoding="bytes"``: compare it as text."""
    return value.decode("latin1") if isinstance(value, bytes) else value


def _same(actual: Any, expected: Any) -> bool:
    """Equal and of the same type (so ``3.0`` or ``True`` cannot stand in for ``3``)."""
    actual = _text(actual)
    return type(actual) is type(expected) and actual == expected


class _UInt8Dtype:
    """Stands in for ``np.dtype('u1', False, True)``; any other dtype is refused."""

    __slots__ = ("state_checked",)
    state_checked: bool

    def __new__(cls, *args: Any) -> _UInt8Dtype:
        # checked in __new__: the NEWOBJ opcode calls it without __init__
        if not (len(args) == 3 and _same(args[0], "u1") and args[1] in (False, 0)
                and type(args[1]) in (bool, int) and args[2] in (True, 1)
                and type(args[2]) in (bool, int)):
            raise UnsafePickleError(f"refused dtype{_brief(args)}: only uint8 arrays are allowed")
        self = super().__new__(cls)
        self.state_checked = False
        return self

    def __setstate__(self, state: Any) -> None:
        if (self.state_checked or not isinstance(state, tuple)
                or len(state) != len(_UINT8_DTYPE_STATE)
                or not all(_same(a, e) if e is not None else a is None
                           for a, e in zip(state, _UINT8_DTYPE_STATE, strict=True))):
            raise UnsafePickleError(f"refused dtype state {_brief(state)}: only the plain uint8 "
                                    f"state {_UINT8_DTYPE_STATE!r} is allowed")
        self.state_checked = True


class _NdarrayMarker:
    """Stands in for ``np.ndarray``: only an argument of ``_reconstruct``, never built."""

    def __new__(cls, *args: Any) -> NoReturn:
        raise UnsafePickleError("refused a direct numpy.ndarray construction")


class _UInt8Array:
    """What ``_reconstruct(ndarray, (0,), b'b')`` returns; ``__setstate__`` makes the array."""

    __slots__ = ("array",)

    def __init__(self) -> None:
        self.array: np.ndarray | None = None

    def __setstate__(self, state: Any) -> None:
        if self.array is not None:
            raise UnsafePickleError("refused a second state for one array")
        if not (isinstance(state, tuple) and len(state) == 5):
            raise UnsafePickleError(f"refused array state of type {type(state).__name__}: "
                                    f"expected (version, shape, dtype, fortran, raw bytes)")
        version, shape, dtype, fortran, raw = state
        if type(version) is not int:
            raise UnsafePickleError(f"refused array state version {_brief(version)}")
        if not (isinstance(shape, tuple) and all(type(n) is int and n >= 0 for n in shape)):
            raise UnsafePickleError(f"refused array shape {_brief(shape)}")
        if not (isinstance(dtype, _UInt8Dtype) and dtype.state_checked):
            raise UnsafePickleError(f"refused array dtype {_brief(dtype)}: only uint8 is allowed")
        if type(fortran) is not bool:
            raise UnsafePickleError(f"refused array order flag {_brief(fortran)}")
        size = math.prod(shape)  # exact: NumPy's int64 product would wrap or overflow
        if type(raw) is not bytes or len(raw) != size:
            raise UnsafePickleError(
                f"refused array data: expected {size} raw bytes for shape {_brief(shape)}, "
                f"got {type(raw).__name__}"
                + (f" of length {len(raw)}" if isinstance(raw, bytes) else ""))
        order: Literal["C", "F"] = "F" if fortran else "C"
        try:  # e.g. more than 64 dimensions, or a huge one beside a zero
            self.array = np.frombuffer(raw, np.uint8).reshape(shape, order=order).copy()
        except ValueError as err:
            raise UnsafePickleError(f"refused array shape {_brief(shape)}: {err}") from None


def _reconstruct_uint8(cls: Any, shape: Any, typecode: Any) -> _UInt8Array:
    """Stands in for ``numpy...multiarray._reconstruct`` with NumPy's fixed arguments."""
    if not (cls is _NdarrayMarker and isinstance(shape, tuple) and len(shape) == 1
            and _same(shape[0], 0) and _same(typecode, "b")):
        raise UnsafePickleError(f"refused _reconstruct({_brief(cls)}, {_brief(shape)}, "
                                f"{_brief(typecode)})")
    return _UInt8Array()


# what a CIFAR batch is made of; anything else (a set, a bytearray, a stand-in) is refused
_CONTAINERS = (dict, list, tuple)
_SCALARS = (type(None), bool, int, float, str, bytes)
_DICT_KEYS = (bytes, str, int)


def _leaf(obj: Any) -> Any:
    """A non-container ``obj`` as the batch holds it: an array stand-in becomes its array."""
    if type(obj) in _SCALARS:
        return obj
    if type(obj) is _UInt8Array:
        if obj.array is None:
            raise UnsafePickleError("refused an array that was never given its data")
        return obj.array
    if isinstance(obj, (_UInt8Dtype, _NdarrayMarker)) or obj is _NdarrayMarker:
        raise UnsafePickleError("refused a bare dtype/ndarray object outside an array")
    raise UnsafePickleError(f"refused an object of type {type(obj).__name__}: a CIFAR batch holds "
                            f"only dicts, lists, tuples, uint8 arrays, numbers, text and bytes")


def _items(container: Any) -> list[Any]:
    """The objects ``container`` holds, keys and values alternating for a dict."""
    if isinstance(container, dict):
        return [part for pair in container.items() for part in pair]
    return list(container)


def _rebuild(original: Any, items: list[Any]) -> Any:
    """A container of ``original``'s type holding ``items`` (as :func:`_items` lists them)."""
    if isinstance(original, list):
        return items
    if isinstance(original, tuple):
        return tuple(items)
    keys = items[0::2]
    if not all(type(key) in _DICT_KEYS for key in keys):
        wrong = next(key for key in keys if type(key) not in _DICT_KEYS)
        raise UnsafePickleError(f"refused a dict key of type {type(wrong).__name__}: only bytes, "
                                f"text and int keys are allowed")
    return dict(zip(keys, items[1::2], strict=True))


def _materialize(root: Any) -> Any:
    """``root`` with every array stand-in replaced by its ``np.ndarray``, within the budget.

    An explicit stack instead of recursion (a deep pickle cannot overflow the C
    stack), each shared container rebuilt once and reused (a small file of
    shared references cannot make the walk exponential), at most
    :data:`MAX_NODES` objects in all and :data:`MAX_DEPTH` nested containers
    along any chain of references (shared ones included); a container that
    holds itself is refused (no CIFAR batch does).
    """
    if type(root) not in _CONTAINERS:
        return _leaf(root)
    # id(container) -> (its rebuilt copy, its height: the containers along its longest chain)
    rebuilt: dict[int, tuple[Any, int]] = {}
    # one frame per container being rebuilt: the container, what it holds, the rebuilt
    # items so far and their heights
    path: list[tuple[Any, list[Any], list[Any], list[int]]] = [(root, _items(root), [], [])]
    on_path = {id(root)}
    nodes = 1 + len(path[0][1])
    while True:
        container, items, done, heights = path[-1]
        if len(done) < len(items):
            item = items[len(done)]
            if type(item) not in _CONTAINERS:
                done.append(_leaf(item))
                heights.append(0)
            elif id(item) in rebuilt:
                copy, height = rebuilt[id(item)]
                done.append(copy)
                heights.append(height)
            elif id(item) in on_path:
                raise UnsafePickleError("refused a container that holds itself: a CIFAR batch is "
                                        "a dict of lists and arrays")
            else:
                if len(path) >= MAX_DEPTH:
                    raise UnsafePickleError(f"refused objects nested deeper than {MAX_DEPTH} "
                                            f"levels: a CIFAR batch is a dict of lists and arrays")
                held = _items(item)
                nodes += len(held)
                if nodes > MAX_NODES:
                    raise UnsafePickleError(f"refused a file of more than {MAX_NODES} objects: "
                                            f"more than a CIFAR batch holds")
                path.append((item, held, [], []))
                on_path.add(id(item))
            continue
        height = 1 + max(heights, default=0)
        if height > MAX_DEPTH:  # a chain through containers first met higher up
            raise UnsafePickleError(f"refused objects nested deeper than {MAX_DEPTH} levels: a "
                                    f"CIFAR batch is a dict of lists and arrays")
        copy = _rebuild(container, done)
        path.pop()
        on_path.discard(id(container))
        if not path:
            return copy
        rebuilt[id(container)] = (copy, height)
        path[-1][2].append(copy)
        path[-1][3].append(height)


def _allowed_globals() -> dict[tuple[str, str], Any]:
    # the original files were written by Python 2 with NumPy 1.x; re-saved ones by NumPy 2
    return {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct_uint8,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct_uint8,
        ("numpy", "ndarray"): _NdarrayMarker,
        ("numpy", "dtype"): _UInt8Dtype,
        ("_codecs", "encode"): _latin1_encode,
    }


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds only ``uint8`` NumPy arrays; any other global is refused.

    ``find_class`` never returns a real NumPy callable: ``numpy.dtype``,
    ``numpy.ndarray`` and ``_reconstruct`` resolve to inert stand-ins that accept
    only what NumPy writes for a ``uint8`` array (anything else, e.g. a float or
    object dtype, raises :class:`UnsafePickleError`). :meth:`load` then replaces
    each stand-in by an array copied from its raw bytes.

    >>> import io, os, pickle
    >>> class Evil:
    ...     def __reduce__(self):
    ...         return (os.system, ("echo pwned",))
    >>> RestrictedUnpickler(io.BytesIO(pickle.dumps(Evil(), protocol=2))).load()
    ... # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    simcore.experiment.cifar.UnsafePickleError: refused global '...system' ...
    """

    _ALLOWED: ClassVar[dict[tuple[str, str], Any] | None] = None

    def load(self) -> Any:
        try:
            loaded = super().load()
        except RecursionError:
            raise UnsafePickleError("refused a pickle nested too deeply to read: a CIFAR batch "
                                    "is a dict of lists and arrays") from None
        return _materialize(loaded)

    def find_class(self, module: str, name: str) -> Any:
        allowed = type(self)._ALLOWED
        if allowed is None:
            allowed = type(self)._ALLOWED = _allowed_globals()
        try:
            return allowed[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refused global '{module}.{name}' while reading a CIFAR pickle: only NumPy array "
                f"reconstruction is allowed, so this file is not a genuine CIFAR batch (it may "
                f"try to run code); nothing from it was executed"
            ) from None


_TUPLE_OPCODES = frozenset({"TUPLE", "TUPLE1", "TUPLE2", "TUPLE3"})
_PUT_OPCODES = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_GET_OPCODES = frozenset({"GET", "BINGET", "LONG_BINGET"})


def check_opcodes(data: bytes) -> None:
    """Refuse a pickle that unpickling alone could not survive, before unpickling it.

    The unpickler builds everything a file describes before :func:`_materialize`
    sees it: at most :data:`MAX_OPCODES` opcodes bound what it builds, and
    tuples nested more than :data:`MAX_DEPTH` deep are refused because hashing
    one (as a dict key) recurses in C without a limit and crashes the process.
    This follows each opcode's stack effect as :mod:`pickletools` documents it,
    keeping for every stack entry how deeply tuples nest in it.
    """
    stack: list[int | None] = []  # per stack entry, tuple nesting; None for a mark
    memo: dict[Any, int | None] = {}
    deepest = 0  # stands in for a memo entry this walk does not know (the load fails there)
    for count, (opcode, arg, _) in enumerate(pickletools.genops(data), start=1):
        if count > MAX_OPCODES:
            raise UnsafePickleError(f"refused a file of more than {MAX_OPCODES} pickle opcodes: "
                                    f"more than a CIFAR batch holds")
        name = opcode.name
        if name in _PUT_OPCODES or name == "MEMOIZE":
            memo[arg if name != "MEMOIZE" else len(memo)] = stack[-1] if stack else 0
            continue
        if name in _GET_OPCODES:
            stack.append(memo.get(arg, deepest))
            continue
        below = opcode.stack_before
        popped: list[int] = []
        if pickletools.markobject in below:  # everything above the mark, the mark, then below it
            while stack and stack[-1] is not None:
                popped.append(stack.pop() or 0)
            below = below[:below.index(pickletools.markobject) + 1]
        for _ in below:
            if stack:
                popped.append(stack.pop() or 0)
        if name in _TUPLE_OPCODES:
            nesting = 1 + max(popped, default=0)
            if nesting > MAX_DEPTH:
                raise UnsafePickleError(f"refused objects nested deeper than {MAX_DEPTH} levels: "
                                        f"a CIFAR batch is a dict of lists and arrays")
            deepest = max(deepest, nesting)
            stack.append(nesting)
        elif name == "DUP":
            stack += [popped[0]] * 2 if popped else [0, 0]
        elif name == "MARK":
            stack.append(None)
        else:  # lists, dicts, sets, frozensets and the stand-ins hash flat or not at all
            stack += [0] * len(opcode.stack_after)


def restricted_load(path: str | Path) -> Any:
    """Unpickle ``path`` with :class:`RestrictedUnpickler` (``encoding="bytes"``, as in CIFAR).

    The opcodes are checked first (:func:`check_opcodes`).
    """
    path = Path(path)
    data = path.read_bytes()
    try:
        check_opcodes(data)
        return RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except UnsafePickleError as err:
        raise UnsafePickleError(f"{path}: {err}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
        raise ValueError(f"{path} is not a readable CIFAR pickle: {err}") from None
