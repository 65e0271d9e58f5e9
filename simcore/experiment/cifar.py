"""A pickle reader for the CIFAR files that runs nothing: :func:`restricted_load`.

CIFAR files are Python pickles, and unpickling can run arbitrary code. They are
read with :class:`RestrictedUnpickler`, which hands the pickle no real callable:
the few globals the files name (NumPy's dtype/array reconstruction, latin-1
``_codecs.encode``) resolve to checked stand-ins that accept only ``uint8``
arrays, and every other global is refused before anything is called, so a
crafted file raises :class:`UnsafePickleError` and runs nothing.
:func:`simcore.experiment.data.load_cifar` reads the batches with it.
"""

from __future__ import annotations

import codecs
import io
import pickle
from pathlib import Path
from typing import Any, ClassVar, Literal, NoReturn

import numpy as np

__all__ = ["RestrictedUnpickler", "UnsafePickleError", "restricted_load"]


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle asked for a global, dtype or array state that the restricted unpickler refuses."""


def _latin1_encode(text: Any, encoding: Any = "utf-8", errors: Any = "strict") -> bytes:
    """``_codecs.encode`` as Python 3 protocol-2 pickles use it for bytes: latin-1 only."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise UnsafePickleError(
            f"refused _codecs.encode({type(text).__name__}, {encoding!r}): only latin-1 text "
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
            raise UnsafePickleError(f"refused dtype{args!r}: only uint8 arrays are allowed")
        self = super().__new__(cls)
        self.state_checked = False
        return self

    def __setstate__(self, state: Any) -> None:
        if (self.state_checked or not isinstance(state, tuple)
                or len(state) != len(_UINT8_DTYPE_STATE)
                or not all(_same(a, e) if e is not None else a is None
                           for a, e in zip(state, _UINT8_DTYPE_STATE, strict=True))):
            raise UnsafePickleError(f"refused dtype state {state!r}: only the plain uint8 "
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
            raise UnsafePickleError(f"refused array state version {version!r}")
        if not (isinstance(shape, tuple) and all(type(n) is int and n >= 0 for n in shape)):
            raise UnsafePickleError(f"refused array shape {shape!r}")
        if not (isinstance(dtype, _UInt8Dtype) and dtype.state_checked):
            raise UnsafePickleError(f"refused array dtype {dtype!r}: only uint8 is allowed")
        if type(fortran) is not bool:
            raise UnsafePickleError(f"refused array order flag {fortran!r}")
        if type(raw) is not bytes or len(raw) != int(np.prod(shape, dtype=np.int64)):
            raise UnsafePickleError(
                f"refused array data: expected {int(np.prod(shape, dtype=np.int64))} raw bytes "
                f"for shape {shape}, got {type(raw).__name__}"
                + (f" of length {len(raw)}" if isinstance(raw, bytes) else ""))
        order: Literal["C", "F"] = "F" if fortran else "C"
        self.array = np.frombuffer(raw, np.uint8).reshape(shape, order=order).copy()


def _reconstruct_uint8(cls: Any, shape: Any, typecode: Any) -> _UInt8Array:
    """Stands in for ``numpy...multiarray._reconstruct`` with NumPy's fixed arguments."""
    if not (cls is _NdarrayMarker and isinstance(shape, tuple) and len(shape) == 1
            and _same(shape[0], 0) and _same(typecode, "b")):
        raise UnsafePickleError(f"refused _reconstruct({cls!r}, {shape!r}, {typecode!r})")
    return _UInt8Array()


def _materialize(obj: Any, seen: dict[int, Any] | None = None) -> Any:
    """``obj`` with every array stand-in replaced by its ``np.ndarray`` (dicts/lists/tuples)."""
    seen = {} if seen is None else seen
    if id(obj) in seen:
        return seen[id(obj)]
    if isinstance(obj, _UInt8Array):
        if obj.array is None:
            raise UnsafePickleError("refused an array that was never given its data")
        return obj.array
    if isinstance(obj, (_UInt8Dtype, _NdarrayMarker)) or obj is _NdarrayMarker:
        raise UnsafePickleError("refused a bare dtype/ndarray object outside an array")
    if isinstance(obj, dict):
        out: dict[Any, Any] = {}
        seen[id(obj)] = out
        out.update({_materialize(k, seen): _materialize(v, seen) for k, v in obj.items()})
        return out
    if isinstance(obj, list):
        items: list[Any] = []
        seen[id(obj)] = items
        items.extend(_materialize(v, seen) for v in obj)
        return items
    if isinstance(obj, tuple):
        return tuple(_materialize(v, seen) for v in obj)
    return obj


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
        return _materialize(super().load())

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


def restricted_load(path: str | Path) -> Any:
    """Unpickle ``path`` with :class:`RestrictedUnpickler` (``encoding="bytes"``, as in CIFAR)."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except UnsafePickleError as err:
        raise UnsafePickleError(f"{path}: {err}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
        raise ValueError(f"{path} is not a readable CIFAR pickle: {err}") from None
