"""The process's random generators as storable values: Python, NumPy's legacy global, torch, CUDA.

A resumed run continues bitwise-identically only if every generator it draws from is where
the saved run left it. :func:`rng_state` captures them as tensors and primitive lists (what
``torch.load(weights_only=True)`` reads back), :func:`set_rng_state` restores them, and
:func:`is_rng_state` checks a value read from an untrusted file has that layout before it is
used. The checkpoint (:mod:`.checkpoint`) stores this next to the model; the layout is defined
here, in one place, for writing, reading and checking.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

__all__ = ["is_rng_state", "rng_state", "set_rng_state"]


def rng_state() -> dict[str, Any]:
    """The Python, NumPy and torch RNG states as tensors and primitive lists."""
    version, words, gauss = random.getstate()
    # The legacy global generator on purpose: it is the one scripts seed with np.random.seed.
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # noqa: NPY002
    state = {
        "python": {"version": version, "state": list(words), "gauss": gauss},
        "numpy": {"name": name, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npy = state["numpy"]
    keys = npy["keys"].numpy().astype(np.uint32)
    legacy = (npy["name"], keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"])
    np.random.set_state(legacy)  # noqa: NPY002
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def is_rng_state(rng: Any) -> bool:
    """Whether ``rng`` has the layout :func:`rng_state` writes (the types of its Python, NumPy
    and torch entries; an optional CUDA entry is not checked)."""
    python = rng.get("python") if isinstance(rng, Mapping) else None
    legacy = rng.get("numpy") if isinstance(rng, Mapping) else None
    return (
        isinstance(python, Mapping) and isinstance(python.get("version"), int)
        and isinstance(python.get("state"), list)
        and all(isinstance(w, int) for w in python["state"])
        and (python.get("gauss") is None or isinstance(python["gauss"], float))
        and isinstance(legacy, Mapping) and isinstance(legacy.get("name"), str)
        and isinstance(legacy.get("keys"), torch.Tensor)
        and all(isinstance(legacy.get(k), int) for k in ("pos", "has_gauss"))
        and isinstance(legacy.get("cached_gaussian"), float)
        and isinstance(rng.get("torch"), torch.Tensor) and rng["torch"].dtype == torch.uint8
    )
