"""The backend registry: every Array-API library the conformance kit can run simcore on.

A :class:`Backend` moves NumPy test inputs into one library (and device) and
results back out, and runs a function the way that backend runs code (eagerly,
or under ``jax.jit`` for ``"jax_jit"``). Frameworks are detected when a backend
is first asked for, never when ``simcore.testing`` is imported, so the kit
costs nothing on a machine that lacks them.

Known backends, in order: ``numpy``, ``array_api_strict``, ``torch`` (CPU),
``torch_cuda`` (only when ``torch.cuda.is_available()``), ``jax`` (eager, CPU
or the default JAX device), ``jax_jit`` (same arrays, calls run under
``jax.jit``), ``cupy`` (only with a usable GPU).

The environment variable ``SIMCORE_TEST_BACKENDS`` (a comma list of names)
picks backends. A backend named there that cannot be imported or used is an
*error*, not a skip: a run that asked for ``torch`` can never pass with zero
torch tests. Unnamed backends that are missing are simply absent.

Setting up the ``jax`` (or ``jax_jit``) backend turns on JAX's 64-bit mode,
``jax.config.update("jax_enable_x64", True)``, process-wide: without it JAX
silently turns float64 into float32 and no float64 test could mean anything.

>>> from simcore.testing import get_backend
>>> import numpy as np
>>> numpy_backend = get_backend("numpy")
>>> x = numpy_backend.asarray(np.array([1.0, 2.0]), dtype="float32")
>>> x.dtype, numpy_backend.to_numpy(x).tolist()
(dtype('float32'), [1.0, 2.0])
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

__all__ = [
    "BACKEND_NAMES",
    "ENV_VAR",
    "Backend",
    "BackendUnavailableError",
    "available_backends",
    "backend_for_namespace",
    "get_backend",
]

#: Environment variable holding a comma list of backend names to run.
ENV_VAR = "SIMCORE_TEST_BACKENDS"

#: Every backend the registry knows, in the order tests list them.
BACKEND_NAMES = ("numpy", "array_api_strict", "torch", "torch_cuda", "jax", "jax_jit", "cupy")


class BackendUnavailableError(RuntimeError):
    """A backend that was asked for by name cannot be imported or used here."""


@dataclasses.dataclass(frozen=True)
class Backend:
    """One array library on one device, as the tests see it.

    ``xp`` is the namespace ``array_api_compat.array_namespace`` returns for
    this backend's arrays, ``device`` the device arrays are placed on and
    ``dtypes`` the floating dtype names the backend is tested in.
    """

    name: str
    xp: Any
    device: Any
    dtypes: tuple[str, ...]
    _dtype_objects: Mapping[str, Any] = dataclasses.field(repr=False)
    _asarray: Callable[[np.ndarray, Any], Any] = dataclasses.field(repr=False)
    _to_numpy: Callable[[Any], np.ndarray] = dataclasses.field(repr=False)
    _runner: Callable[..., Any] | None = dataclasses.field(default=None, repr=False)

    def dtype(self, name: str) -> Any:
        """The library's dtype object for a dtype name (``"float32"``, ``"int64"``, ...)."""
        if name in self._dtype_objects:
            return self._dtype_objects[name]
        found = getattr(self.xp, name, None)
        if found is None:
            raise ValueError(f"backend {self.name!r} has no dtype named {name!r}")
        return found

    def dtype_name(self, dtype: Any) -> str:
        """Inverse of :meth:`dtype`: the name of one of the library's dtype objects."""
        for name, obj in self._dtype_objects.items():
            if obj == dtype:
                return name
        for name in ("int8", "int16", "int32", "int64", "uint8", "bool"):
            if getattr(self.xp, name, None) == dtype:
                return name
        return str(dtype)

    def asarray(self, array: Any, dtype: str | None = None) -> Any:
        """Copy a NumPy array onto this backend's device; ``dtype=None`` keeps its dtype.

        ``dtype`` is a name such as ``"bfloat16"``; the cast happens on the
        backend, so NumPy never needs a dtype it does not have.
        """
        array = np.asarray(array)
        target = None if dtype is None else self.dtype(dtype)
        return self._asarray(array, target)

    def rounded(self, array: Any, dtype: str) -> np.ndarray:
        """``array`` rounded to ``dtype`` on this backend, read back as NumPy float64.

        The input a reference should see when the backend computes in ``dtype``.
        """
        return self.to_numpy(self.asarray(array, dtype)).astype(np.float64)

    def to_numpy(self, x: Any) -> np.ndarray:
        """A NumPy copy of ``x`` (detached, on the host); bfloat16 comes back as float32."""
        return self._to_numpy(x)

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call ``fn(*args, **kwargs)`` the way this backend runs code.

        Eager backends just call it. ``jax_jit`` compiles
        ``functools.partial(fn, **kwargs)`` with ``jax.jit`` (keyword arguments
        are static, positional ones traced) and calls it on ``args``; a dataclass
        result (such as :class:`simcore.SimilarityStats`) is rebuilt after the call.
        """
        if self._runner is None:
            return fn(*args, **kwargs)
        return self._runner(fn, *args, **kwargs)


# --------------------------------------------------------------------------- factories
# Each factory imports its library only when called and raises
# BackendUnavailableError with the reason when the backend cannot run here.


def _unavailable(name: str, why: Any) -> BackendUnavailableError:
    return BackendUnavailableError(f"backend {name!r} is not usable here: {why}")


def _namespace_of_sample(sample: Any) -> Any:
    import array_api_compat

    return array_api_compat.array_namespace(sample)


def _numpy_backend() -> Backend:
    dtypes = {"float16": np.float16, "float32": np.float32, "float64": np.float64}

    def asarray(array, dtype):
        return np.array(array, dtype=dtype, copy=True)

    def to_numpy(x):
        return np.array(x, copy=True)

    return Backend(
        name="numpy",
        xp=_namespace_of_sample(np.zeros(1)),
        device="cpu",
        dtypes=("float32", "float64", "float16"),
        _dtype_objects=dtypes,
        _asarray=asarray,
        _to_numpy=to_numpy,
    )


def _array_api_strict_backend() -> Backend:
    try:
        import array_api_strict as strict
    except ImportError as err:
        raise _unavailable("array_api_strict", err) from err
    dtypes = {"float32": strict.float32, "float64": strict.float64}
    device = strict.Device("CPU_DEVICE")

    def asarray(array, dtype):
        x = strict.asarray(np.array(array, copy=True), device=device)
        return x if dtype is None else strict.astype(x, dtype)

    def to_numpy(x):
        return np.array(np.from_dlpack(x), copy=True)

    return Backend(
        name="array_api_strict",
        xp=_namespace_of_sample(strict.zeros(1)),
        device=device,
        dtypes=("float32", "float64"),
        _dtype_objects=dtypes,
        _asarray=asarray,
        _to_numpy=to_numpy,
    )


def _torch_backend(name: str, device_name: str) -> Backend:
    try:
        import torch
    except ImportError as err:
        raise _unavailable(name, err) from err
    if device_name == "cuda" and not torch.cuda.is_available():
        raise _unavailable(name, "torch.cuda.is_available() is False")
    device = torch.device(device_name, 0) if device_name == "cuda" else torch.device("cpu")
    dtypes = {
        "float32": torch.float32,
        "float64": torch.float64,
        "bfloat16": torch.bfloat16,
        "float16": torch.float16,
    }

    def asarray(array, dtype):
        x = torch.as_tensor(np.array(array, copy=True)).to(device)
        return x if dtype is None else x.to(dtype)

    def to_numpy(x):
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:
            x = x.to(torch.float32)
        return x.numpy().copy()

    return Backend(
        name=name,
        xp=_namespace_of_sample(torch.zeros(1, device=device)),
        device=device,
        dtypes=("float32", "float64", "bfloat16", "float16"),
        _dtype_objects=dtypes,
        _asarray=asarray,
        _to_numpy=to_numpy,
    )


def _freeze(value: Any) -> Any:
    """A hashable stand-in for a keyword argument (lists become tuples); raises if none."""
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_freeze(v) for v in value))
    hash(value)
    return value


_JIT_CACHE: dict[Any, Any] = {}
_JIT_CACHE_SIZE = 256


def _jit_compiled(fn, kwargs):
    """``jax.jit`` of ``partial(fn, **kwargs)``, reused for equal ``(fn, kwargs)``.

    Reuse lets JAX's own cache skip recompiling for input shapes it has seen.
    The wrapper turns a dataclass result into a dict (jit returns pytrees only)
    and remembers the type so :func:`_jit_runner` can rebuild it.
    """
    import jax

    try:
        key = (fn, _freeze(sorted(kwargs.items())))
    except TypeError:  # an unhashable keyword argument: compile afresh
        key = None
    if key is not None and key in _JIT_CACHE:
        return _JIT_CACHE[key]
    partial_fn = functools.partial(fn, **kwargs)
    rebuild: dict[str, Any] = {}

    def traced(*args):
        out = partial_fn(*args)
        if dataclasses.is_dataclass(out) and not isinstance(out, type):
            rebuild["type"] = type(out)
            return {f.name: getattr(out, f.name) for f in dataclasses.fields(out)}
        return out

    compiled = (jax.jit(traced), rebuild)
    if key is not None:
        if len(_JIT_CACHE) >= _JIT_CACHE_SIZE:
            _JIT_CACHE.pop(next(iter(_JIT_CACHE)))
        _JIT_CACHE[key] = compiled
    return compiled


def _jit_runner(fn, *args, **kwargs):
    jitted, rebuild = _jit_compiled(fn, kwargs)
    result = jitted(*args)
    return rebuild["type"](**result) if "type" in rebuild else result


def _jax_backend(name: str) -> Backend:
    try:
        import jax
        import jax.numpy as jnp
    except ImportError as err:
        raise _unavailable(name, err) from err
    # float64 tests need 64-bit mode; without it jnp silently makes float64 arrays float32.
    jax.config.update("jax_enable_x64", True)
    device = jax.devices()[0]
    dtypes = {
        "float32": jnp.float32,
        "float64": jnp.float64,
        "bfloat16": jnp.bfloat16,
        "float16": jnp.float16,
    }

    def asarray(array, dtype):
        x = jax.device_put(jnp.asarray(np.array(array, copy=True)), device)
        return x if dtype is None else x.astype(dtype)

    def to_numpy(x):
        out = np.array(x, copy=True)
        if out.dtype == jnp.bfloat16:
            out = out.astype(np.float32)
        return out

    return Backend(
        name=name,
        xp=_namespace_of_sample(jnp.zeros(1)),
        device=device,
        dtypes=("float32", "float64", "bfloat16", "float16"),
        _dtype_objects=dtypes,
        _asarray=asarray,
        _to_numpy=to_numpy,
        _runner=_jit_runner if name == "jax_jit" else None,
    )


def _cupy_backend() -> Backend:
    try:
        import cupy
    except ImportError as err:
        raise _unavailable("cupy", err) from err
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise _unavailable("cupy", "no CUDA device")
        device = cupy.cuda.Device(0)
        sample = cupy.zeros(1)
    except BackendUnavailableError:
        raise
    except Exception as err:  # noqa: BLE001 - CUDA driver/runtime errors have many types
        raise _unavailable("cupy", err) from err
    dtypes = {"float16": cupy.float16, "float32": cupy.float32, "float64": cupy.float64}

    def asarray(array, dtype):
        with device:
            return cupy.asarray(np.array(array, copy=True), dtype=dtype)

    def to_numpy(x):
        return cupy.asnumpy(x)

    return Backend(
        name="cupy",
        xp=_namespace_of_sample(sample),
        device=device,
        dtypes=("float32", "float64", "float16"),
        _dtype_objects=dtypes,
        _asarray=asarray,
        _to_numpy=to_numpy,
    )


_FACTORIES: dict[str, Callable[[], Backend]] = {
    "numpy": _numpy_backend,
    "array_api_strict": _array_api_strict_backend,
    "torch": functools.partial(_torch_backend, "torch", "cpu"),
    "torch_cuda": functools.partial(_torch_backend, "torch_cuda", "cuda"),
    "jax": functools.partial(_jax_backend, "jax"),
    "jax_jit": functools.partial(_jax_backend, "jax_jit"),
    "cupy": _cupy_backend,
}

_CACHE: dict[str, Backend | BackendUnavailableError] = {}


def _build(name: str) -> Backend:
    if name not in _CACHE:
        try:
            _CACHE[name] = _FACTORIES[name]()
        except BackendUnavailableError as err:
            _CACHE[name] = err
    found = _CACHE[name]
    if isinstance(found, BackendUnavailableError):
        raise found
    return found


def get_backend(name: str) -> Backend:
    """The backend called ``name``; raises if it is unknown or cannot run here.

    Raises ``ValueError`` for an unknown name and :class:`BackendUnavailableError`
    when the library is missing or has no usable device.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    if name not in _FACTORIES:
        raise ValueError(f"unknown backend {name!r}; known backends: {', '.join(BACKEND_NAMES)}")
    return _build(name)


def requested_backend_names(value: str | None = None) -> list[str] | None:
    """The names in ``SIMCORE_TEST_BACKENDS`` (or ``value``), or None when it is unset/empty."""
    source = ENV_VAR if value is None else "backend list"
    raw = os.environ.get(ENV_VAR, "") if value is None else value
    names = [part.strip() for part in raw.split(",") if part.strip()]
    if not names:
        return None
    unknown = [n for n in names if n not in _FACTORIES]
    if unknown:
        raise ValueError(
            f"{source} names unknown backend(s) {', '.join(map(repr, unknown))}; "
            f"known backends: {', '.join(BACKEND_NAMES)}"
        )
    return list(dict.fromkeys(names))


def available_backends(names: str | list[str] | None = None) -> list[Backend]:
    """The backends to test, honouring ``SIMCORE_TEST_BACKENDS``.

    ``names`` (a comma string or a list) overrides the environment variable.
    Every explicitly named backend must be usable, else
    :class:`BackendUnavailableError` is raised; with no names every usable
    backend is returned and missing ones are left out.
    """
    if isinstance(names, (list, tuple)):
        names = ",".join(names)
    requested = requested_backend_names(names)
    if requested is None:
        found = []
        for name in BACKEND_NAMES:
            try:
                found.append(_build(name))
            except BackendUnavailableError:
                continue
        return found
    return [get_backend(name) for name in requested]


def backend_for_namespace(xp: Any) -> Backend:
    """A :class:`Backend` for an Array-API namespace, so any library can be checked.

    A registered backend's namespace (or the bare module, e.g. ``numpy`` or
    ``torch``) gives that registered backend (the first one, e.g. eager
    ``jax`` rather than ``jax_jit``). Any other namespace is wrapped generically:
    inputs go in through ``xp.asarray`` on its default device, results come back
    through DLPack, and it is tested in float32 and float64.
    """
    if isinstance(xp, Backend):
        return xp
    module_name = getattr(xp, "__name__", "")
    aliases = {
        "numpy": "numpy",
        "array_api_compat.numpy": "numpy",
        "array_api_strict": "array_api_strict",
        "torch": "torch",
        "array_api_compat.torch": "torch",
        "jax.numpy": "jax",
        "jax": "jax",
        "cupy": "cupy",
        "array_api_compat.cupy": "cupy",
    }
    if module_name in aliases:
        return get_backend(aliases[module_name])
    if not hasattr(xp, "asarray") or not hasattr(xp, "float64"):
        raise TypeError(f"xp must be an Array-API namespace, got {type(xp).__name__}")
    sample = xp.asarray([0.0])
    dtypes = {"float32": xp.float32, "float64": xp.float64}

    def asarray(array, dtype):
        x = xp.asarray(np.array(array, copy=True))
        return x if dtype is None else xp.astype(x, dtype)

    def to_numpy(x):
        return np.array(np.from_dlpack(x), copy=True)

    import array_api_compat

    return Backend(
        name=module_name or type(xp).__name__,
        xp=array_api_compat.array_namespace(sample),
        device=array_api_compat.device(sample),
        dtypes=("float32", "float64"),
        _dtype_objects=dtypes,
        _asarray=asarray,
        _to_numpy=to_numpy,
    )
