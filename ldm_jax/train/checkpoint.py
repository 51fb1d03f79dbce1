"""Orbax checkpoints of a run: the train state and the data iterator, saved together.

Saving is asynchronous: the step loop goes on while orbax writes, and a checkpoint
directory only becomes visible once complete, so a run killed mid-save resumes from the
previous one.

`workdir` may be local or gs://: orbax takes the checkpoint folder as an etils.epath.Path
(its metadata through epath, its arrays through tensorstore, see ldm_jax.fs). A local
workdir is made absolute, as orbax wants; a URL never is.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from ldm_jax import fs
from ldm_jax.logs import disk_full, mute_library_tracebacks
from ldm_jax.data.pipeline import iterator_restore_args, iterator_save_args


def checkpoint_dir(workdir: str) -> epath.Path:
  """`workdir`/checkpoints for orbax: absolute when local, the URL as is when remote."""
  if fs.is_remote(workdir):
    fs.ensure_configured()
  return epath.Path(fs.absolute(os.fspath(workdir))) / "checkpoints"


def make_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
  """The run's manager. Saves that an earlier run left unfinished (killed mid-save) are
  removed now, and said so: orbax never counts them as checkpoints, but they take space
  and look like one."""
  directory = checkpoint_dir(workdir)
  if jax.process_index() == 0 and fs.isdir(directory):
    # Temporary-path objects (orbax 0.12) or names (older orbax).
    unfinished = [os.path.basename(os.fspath(p.get() if hasattr(p, "get") else p))
                  for p in ocp.utils.tmp_checkpoints(directory)]
    if unfinished:
      logging.warning("removing %d unfinished checkpoint save(s) an interrupted run left in "
                      "%s: %s", len(unfinished), directory, ", ".join(sorted(unfinished)))
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True,
                                         create=True, cleanup_tmp_directories=True)
  return ocp.CheckpointManager(directory, item_names=("state", "data"), options=options)


class CheckpointWriteError(RuntimeError):
  """A checkpoint could not be written (a full disk, lost permissions); says which step
  failed and which complete checkpoint the run can resume from."""


class SaveTracker:
  """The loop's saves: which steps were asked for, which completed, and a failed
  asynchronous save turned into one CheckpointWriteError naming both. Orbax reports a
  failed background write only at the next save or wait, so the failing step is read off
  the disk (asked for, yet not complete), not assumed to be the current one."""

  def __init__(self, workdir: str, manager: ocp.CheckpointManager, last_saved: int | None):
    self.workdir, self.manager = workdir, manager
    # The newest step saved or being saved (complete once `wait` returns): what the run
    # resumes from if it stops now in an orderly way.
    self.last_saved = last_saved
    self._asked: list[int] = []

  def save(self, step: int, state: Any, data_iterator, force: bool = False) -> bool:
    self._asked.append(step)
    try:
      saved = save(self.manager, step, state, data_iterator, force=force)
    except Exception as e:  # pylint: disable=broad-except  # orbax's, tensorstore's, OS's
      raise self._error(e) from e
    if saved:
      self.last_saved = step
    return saved

  def wait(self, quiet: bool = False) -> None:
    """Waits for the saves in flight; `quiet` (cleanup after another error) logs a failure
    instead of raising it."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      if not quiet:
        raise self._error(e) from e
      logging.error("%s", self._error(e))

  def blame(self, e: Exception) -> CheckpointWriteError | None:
    """For a full disk met by another writer (the metrics' event file, say): while a save
    was in flight, that save filled the disk and is what failed, so the error names it;
    None when every save asked for completed (the other write failed on its own)."""
    if isinstance(e, CheckpointWriteError) or not disk_full(e):
      return None
    try:
      self.manager.wait_until_finished()  # let the failing save end, quietly
    except Exception:  # pylint: disable=broad-except  # reported below
      pass
    try:
      complete = saved_steps(self.workdir)
    except Exception:  # pylint: disable=broad-except
      return None
    if all(s in complete for s in self._asked):
      return None
    return self._error(e)

  def _error(self, e: Exception) -> CheckpointWriteError:
    try:
      complete = saved_steps(self.workdir)
    except Exception:  # pylint: disable=broad-except  # the disk may refuse reads too
      complete = []
    failed = [s for s in self._asked if s not in complete] or self._asked[-1:]
    last = (f"the last complete checkpoint is step {complete[-1]}, which a rerun resumes "
            f"from" if complete else "no complete checkpoint was saved")
    if disk_full(e):
      mute_library_tracebacks()  # every orbax writer thread fails too
    cause = "no space left on device" if disk_full(e) else _last_line(e)
    hint = (" Free space (or lower train.keep_checkpoints) and rerun the same command" if
            disk_full(e) else " Rerun the same command once the cause is fixed")
    return CheckpointWriteError(
        f"saving the checkpoint of step {failed[0]} in {checkpoint_dir(self.workdir)} "
        f"failed: {cause}; {last}.{hint}")


def _last_line(e: BaseException) -> str:
  lines = str(e).strip().splitlines()
  return f"{type(e).__name__}: {lines[-1] if lines else ''}"


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_iterator,
         force: bool = False) -> bool:
  return manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=iterator_save_args(data_iterator)),
      force=force)


def abstract_with_shardings(state: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      state, shardings)


def _restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any,
             data_iterator=None) -> Any:
  """The state saved at `step` laid out as `abstract_state`, older checkpoints included.

  A state class may list `ADDED_FIELDS = {name: value}`: fields a newer ldm_jax added,
  with the value that reproduces what runs did before (the LDM's latent shift is 0). A
  checkpoint written without one restores the rest exactly and takes that value, laid
  out as the target says; every other difference still fails in orbax.
  """
  added = getattr(type(abstract_state), "ADDED_FIELDS", {})
  saved = set()
  if added:  # read from the files: a manager opened only to restore has no handler yet
    saved = set(ocp.StandardCheckpointHandler().metadata(
        epath.Path(manager.directory) / str(step) / "state").tree)
  missing = {name: value for name, value in added.items() if name not in saved}
  target = abstract_state
  if missing:  # the saved fields as a dict: the structure on disk
    target = {f.name: getattr(abstract_state, f.name)
              for f in dataclasses.fields(abstract_state) if f.name not in missing}
  items = {"state": ocp.args.StandardRestore(target)}
  if data_iterator is not None:
    items["data"] = iterator_restore_args(data_iterator)
  state = manager.restore(step, args=ocp.args.Composite(**items))["state"]
  if not missing:
    return state
  for name, value in missing.items():
    like = getattr(abstract_state, name)
    state[name] = jax.device_put(jax.numpy.full(like.shape, value, like.dtype), like.sharding)
  return type(abstract_state)(**state)


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any,
            data_iterator=None) -> Any:
  """The state saved at `step` laid out as `abstract_state`; the iterator is set in place."""
  return _restore(manager, step, abstract_state, data_iterator)


def restore_state_only(workdir: str, abstract_state: Any,
                       step: int | None = None) -> tuple[Any, int]:
  """For export and evaluation: the newest (or given) state, without the data pipeline.
  A step that was not saved is a FileNotFoundError listing the saved ones."""
  step = resolve_step(workdir, step)
  directory = checkpoint_dir(workdir)
  with ocp.CheckpointManager(directory, item_names=("state", "data")) as manager:
    return _restore(manager, step, abstract_state), step


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
