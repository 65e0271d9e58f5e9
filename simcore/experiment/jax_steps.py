"""The compiled steps of a JAX run: each compiled once per model size, and only once.

XLA compiles a jitted function again for every new argument shape and placement, and on a
CPU one compilation of a grown seed's training step costs seconds. So the runner
(:mod:`.jax_runner`) pads every batch to one size with a mask of its real examples
(:func:`masked_loss`: the mean over them; the seeds' BatchNorm takes the mask too), commits
every array to its device, and runs the steps through :class:`CompiledOnce`, which compiles
on the first call and refuses a call that would compile again. See docs/design.md,
"`simcore grow` on JAX".
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

__all__ = ["CPU_COMPILER_OPTIONS", "CompiledOnce", "compiled_steps", "cross_entropy",
           "masked_loss"]


def cross_entropy(logits, labels):
    """The mean cross-entropy of integer labels (the growers' ``loss_fn``)."""
    import optax

    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def masked_loss(logits, labels, mask):
    """The mean cross-entropy over the real examples of a padded batch (``mask`` True)."""
    import jax.numpy as jnp
    import optax

    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return jnp.where(mask, losses, 0.0).sum() / mask.sum()


class CompiledOnce:
    """``jax.jit(fn)`` compiled ahead of time on its first call, and only then.

    A later call with other shapes raises instead of compiling again unseen (each compilation
    of the training step costs seconds on a CPU), and :attr:`seconds` is what lowering and
    compiling took, measured apart from running. ``options``: XLA compiler options, dropped
    when this XLA does not know them.
    """

    def __init__(self, fn: Callable, options: dict[str, Any] | None = None):
        import jax

        self.jitted, self.options = jax.jit(fn), options or None
        self.executable: Any = None
        self.seconds = 0.0

    def __call__(self, *args):
        if self.executable is None:
            started = time.perf_counter()
            lowered = self.jitted.lower(*args)
            try:
                self.executable = lowered.compile(compiler_options=self.options)
            except RuntimeError as error:  # another XLA: its own defaults
                if self.options is None or "compile option" not in str(error):
                    raise
                self.executable = lowered.compile()
            self.seconds = time.perf_counter() - started
        return self.executable(*args)


#: XLA options for the steps on a CPU. Measured on this project's loaded 2-core machine
#: (docs/design.md, "`simcore grow` on JAX"): XLA's older fusion emitters and LLVM at -O1
#: compile a grown VGG16's training step (odd widths) in about half the time (8.2 s -> 4.2 s)
#: and run it as fast; a grown MobileNetV1's, 11.5 s -> 6.9 s.
CPU_COMPILER_OPTIONS: dict[str, Any] = {"xla_cpu_use_fusion_emitters": False,
                                        "xla_backend_optimization_level": 1}


def compiled_steps(model, tx, options: dict[str, Any] | None = None
                   ) -> tuple[CompiledOnce, CompiledOnce]:
    """The training step and the evaluation count of ``model`` (rebuilt after each growth).

    Both take batches padded to one size with a mask of their real examples (the loss is the
    mean over those, BatchNorm's statistics are theirs), so each compiles once per model size:
    an epoch's smaller last batch, or a split's, is padded instead of compiled for.
    """
    import jax
    import optax

    def train_step(params, batch_stats, opt_state, x, y, mask, lr):
        def loss_of(p):
            logits, updates = model.apply({"params": p, "batch_stats": batch_stats}, x,
                                          train=True, mask=mask, mutable=["batch_stats"])
            return masked_loss(logits, y, mask), (logits, updates["batch_stats"])

        (loss, (logits, stats)), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, jax.tree_util.tree_map(lambda u: -lr * u, updates))
        return params, stats, opt_state, loss, ((logits.argmax(-1) == y) & mask).sum()

    def count_correct(variables, x, y, mask):
        return ((model.apply(variables, x).argmax(-1) == y) & mask).sum()

    return CompiledOnce(train_step, options), CompiledOnce(count_correct, options)
