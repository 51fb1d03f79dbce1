"""Orbax checkpoints of a run: the train state and the data iterator, saved together.

Saving is asynchronous: the step loop goes on while orbax writes, and a checkpoint
directory only becomes visible once complete, so a run killed mid-save resumes from the
previous one.

`workdir` may be local or gs://: orbax takes the checkpoint folder as an etils.epath.Path
(its metadata through epath, its arrays through tensorstore, see ldm_jax.fs). A local
workdir is made absolute, as orbax wants; a URL never is.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from ldm_jax import fs
from ldm_jax.data.pipeline import iterator_restore_args, iterator_save_args


def checkpoint_dir(workdir: str) -> epath.Path:
  """`workdir`/checkpoints for orbax: absolute when local, the URL as is when remote."""
  if fs.is_remote(workdir):
    fs.ensure_configured()
  return epath.Path(fs.absolute(os.fspath(workdir))) / "checkpoints"


def make_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True,
                                         create=True)
  return ocp.CheckpointManager(checkpoint_dir(workdir), item_names=("state", "data"),
                               options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_iterator,
         force: bool = False) -> bool:
  return manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=iterator_save_args(data_iterator)),
      force=force)


def abstract_with_shardings(state: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      state, shardings)


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any,
            data_iterator=None) -> Any:
  """The state saved at `step` laid out as `abstract_state`; the iterator is set in place."""
  items = {"state": ocp.args.StandardRestore(abstract_state)}
  if data_iterator is not None:
    items["data"] = iterator_restore_args(data_iterator)
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  return restored["state"]


def restore_state_only(workdir: str, abstract_state: Any,
                       step: int | None = None) -> tuple[Any, int]:
  """For export and evaluation: the newest (or given) state, without the data pipeline.
  A step that was not saved is a FileNotFoundError listing the saved ones."""
  step = resolve_step(workdir, step)
  directory = checkpoint_dir(workdir)
  with ocp.CheckpointManager(directory, item_names=("state", "data")) as manager:
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))
  return restored["state"], step


def resolve_step(workdir: str, step: int | None = None) -> int:
  """`step` if `workdir` saved it, else the newest saved step when `step` is None; a
  FileNotFoundError saying what there is otherwise. Reads only (commands call it before
  building anything)."""
  directory = checkpoint_dir(workdir)
  steps = saved_steps(workdir)
  if not steps:
    raise FileNotFoundError(f"no checkpoint in {directory}; train first, or check --workdir")
  if step is None:
    return steps[-1]
  if step not in steps:
    raise FileNotFoundError(f"no checkpoint of step {step} in {directory}; saved steps: "
                            f"{', '.join(str(s) for s in steps)}")
  return step


def saved_steps(workdir: str) -> list[int]:
  """The steps of the complete checkpoints in `workdir` (none when it has no checkpoints/);
  creates nothing."""
  directory = checkpoint_dir(workdir)
  if not fs.isdir(directory):
    return []
  return sorted(ocp.utils.checkpoint_steps(directory))
