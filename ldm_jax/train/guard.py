"""The non-finite guard: a NaN or Inf never reaches a checkpoint, an export or the weights.

On device, inside each compiled step: the step's guarded values (loss, gradient norms, the
updated parameters) are checked, and an update with any non-finite one is dropped — the
state keeps its previous values, only the step counter moves on (the batch is consumed, so
a resumed run sees the data an uninterrupted one would). The step reports what it found as
a few int32 scalars under `metrics["guard"]`.

On the host, `NonFiniteGuard` adds those reports up without reading them (no per-step
sync) and reads them only when the loop already syncs: at the log interval and before
every checkpoint save. Then, by `train.on_nonfinite`:
  stop  (default) raise `NonFiniteError` naming the first bad step and the values; the loop
        saves nothing more, so every checkpoint on disk is one from before the bad step,
        none is pruned in favour of a bad one, and the export is left as it was;
  skip  log the skipped updates and go on, until more than `train.max_nonfinite` were
        skipped in this process, then stop as above.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

POLICIES = ("stop", "skip")
DEFAULT_MAX_NONFINITE = 100
_NEVER = np.iinfo(np.int32).max  # first_step of a report with nothing non-finite


class NonFiniteError(RuntimeError):
  """Training stopped on a non-finite update; nothing after the last good step was saved."""


def tree_finite(tree: Any) -> jax.Array:
  """True where every floating-point leaf of `tree` is finite (integers always are)."""
  flags = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)
           if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)]
  return jnp.all(jnp.stack(flags)) if flags else jnp.ones((), bool)


def check(finite: dict[str, jax.Array], step: jax.Array) -> tuple[jax.Array, dict]:
  """(ok, report) for one update. `finite` maps each guarded name to a boolean scalar, in
  the order the host decodes (`NonFiniteGuard(names=...)`); `step` is the state's step
  before the update."""
  which = jnp.zeros((), jnp.int32)
  for bit, flag in enumerate(finite.values()):
    which = which | jnp.where(flag, 0, 1 << bit).astype(jnp.int32)
  ok = which == 0
  report = {"skipped": (~ok).astype(jnp.int32), "which": which,
            "first_step": jnp.where(ok, _NEVER, step + 1).astype(jnp.int32)}
  return ok, report


def keep_if(ok: jax.Array, new: Any, old: Any) -> Any:
  """`new` where the update is good, else `old`, leaf by leaf (a select XLA fuses into the
  update's elementwise ops; with the state donated it costs no copy)."""
  return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


def _combine(a: dict, b: dict) -> dict:
  return {"skipped": a["skipped"] + b["skipped"], "which": a["which"] | b["which"],
          "first_step": jnp.minimum(a["first_step"], b["first_step"])}


def guard_settings(train) -> tuple[str, int]:
  """(train.on_nonfinite, train.max_nonfinite) of a `train` block; runs saved before they
  existed stop."""
  return (str(train.get("on_nonfinite", "stop")),
          int(train.get("max_nonfinite", DEFAULT_MAX_NONFINITE)))


def check_policy(policy: str, limit: int) -> None:
  if policy not in POLICIES:
    raise ValueError(f"train.on_nonfinite={policy!r}; choose one of {POLICIES}")
  if limit < 0:
    raise ValueError(f"train.max_nonfinite={limit} must be >= 0")


class NonFiniteGuard:
  """Host side: accumulates the steps' reports on device, reads them when asked."""

  def __init__(self, names: Sequence[str], policy: str = "stop",
               limit: int = DEFAULT_MAX_NONFINITE):
    check_policy(policy, limit)
    self.names = tuple(names)
    self.policy = policy
    self.limit = int(limit)
    self.skipped = 0  # in this process, over the whole run
    self._pending = None

  def add(self, report: dict) -> None:
    self._pending = report if self._pending is None else _combine(self._pending, report)

  def note(self) -> str:
    """For the console line: the updates skipped so far, if any."""
    return f"skipped {self.skipped} non-finite update(s)" if self.skipped else ""

  def check(self, step: int, last_good: int | None) -> None:
    """Reads the reports since the last check (a host sync) and acts on them. `step` is the
    host's step counter, `last_good` the newest saved checkpoint's step (for the message)."""
    if self._pending is None:
      return
    report = {k: int(v) for k, v in jax.device_get(self._pending).items()}
    self._pending = None
    if not report["skipped"]:
      return
    self.skipped += report["skipped"]
    bad = [name for bit, name in enumerate(self.names) if report["which"] >> bit & 1]
    what = (f"non-finite {' and '.join(bad)} first at step {report['first_step']} "
            f"({report['skipped']} update(s) up to step {step})")
    if self.policy == "skip" and self.skipped <= self.limit:
      logging.warning("skipped %s; %d of at most %d skipped so far (train.max_nonfinite)",
                      what, self.skipped, self.limit)
      return
    kept = (f"the newest checkpoint (step {last_good}) and the export are untouched"
            if last_good is not None else "no checkpoint was saved")
    if self.policy == "skip":
      why = f"more than train.max_nonfinite={self.limit} updates were skipped"
      fix = "lower the learning rate, or raise train.max_nonfinite"
    else:
      why = "train.on_nonfinite='stop'"
      fix = ("lower the learning rate (or clip gradients: optim.grad_clip_norm) and rerun to "
             "resume from it, or set --config.train.on_nonfinite=skip to drop such updates")
    raise NonFiniteError(f"training stopped: {what}; {why}. Nothing after the last good "
                         f"step was saved: {kept}. To go on, {fix}.")
