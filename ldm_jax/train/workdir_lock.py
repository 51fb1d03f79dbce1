"""One writer per workdir: a lock held for the life of a training run.

Two runs writing one workdir interleave checkpoints, event files and metric rows, and one
of them ends inside orbax. The lock is a small JSON object, `WORKDIR/lock.json`, naming
its holder (host, process id, start time, command), created only if absent:

- on a local disk with O_CREAT | O_EXCL (atomic on POSIX filesystems, NFS v3+ included);
- on gs:// as an upload with the precondition `ifGenerationMatch=0` (the object must not
  exist), which GCS evaluates atomically; google-cloud-storage sends it.

A second run finds the object there and refuses, naming the holder. A lock whose holder is
gone — same host, and that process no longer running (or its id reused by another) — is
taken over with a message. On another host nothing can tell a live holder from a crashed
one, so the message says how to remove the lock by hand. A multi-host run holds one lock,
process 0's: the others learn its outcome by a broadcast and refuse with it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import time
from typing import Iterator

from absl import logging

from ldm_jax import fs

LOCK_FILE = "lock.json"


class WorkdirLocked(RuntimeError):
  """Another run holds the workdir."""


def _process_start(pid: int) -> str | None:
  """The kernel's start time of `pid` (clock ticks since boot), which tells a live holder
  from a later process that got the same id; None where /proc does not say."""
  try:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
      return f.read().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _holder() -> dict:
  pid = os.getpid()
  return {"host": socket.gethostname(), "pid": pid, "pid_start": _process_start(pid),
          "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(sys.argv)}


def _alive(holder: dict) -> bool:
  """False only when `holder` ran on this host and is certainly gone."""
  if holder.get("host") != socket.gethostname():
    return True
  pid = holder.get("pid")
  if not isinstance(pid, int):
    return True
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, another user's
    return True
  start = holder.get("pid_start")
  return start is None or _process_start(pid) in (None, start)


def _describe(holder: dict) -> str:
  return (f"process {holder.get('pid')} on {holder.get('host')}, started "
          f"{holder.get('started')} ({holder.get('command')})")


class _Local:
  def __init__(self, path: str):
    self.path = path

  def create(self, text: str) -> bool:
    try:
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(text)
    return True

  def read(self) -> str | None:
    try:
      with open(self.path, encoding="utf-8") as f:
        return f.read()
    except FileNotFoundError:
      return None

  def remove(self) -> None:
    with contextlib.suppress(FileNotFoundError):
      os.remove(self.path)


class _Gcs:
  """The lock as a GCS object; the generation it was created with guards its deletion, so
  a run never removes a lock that another run took over."""

  def __init__(self, url: str):
    from google.cloud import storage
    fs.ensure_configured()
    bucket, _, name = url[len("gs://"):].partition("/")
    if fs.emulator_url():
      client = storage.Client.create_anonymous_client()
    else:
      client = storage.Client()
    self.blob = client.bucket(bucket).blob(name)
    self.generation = None

  def create(self, text: str) -> bool:
    from google.api_core import exceptions
    try:
      self.blob.upload_from_string(text, content_type="application/json",
                                   if_generation_match=0)
    except exceptions.PreconditionFailed:
      return False
    self.generation = self.blob.generation
    return True

  def read(self) -> str | None:
    from google.api_core import exceptions
    try:
      return self.blob.download_as_text()
    except exceptions.NotFound:
      return None

  def remove(self) -> None:
    from google.api_core import exceptions
    with contextlib.suppress(exceptions.NotFound, exceptions.PreconditionFailed):
      self.blob.delete(if_generation_match=self.generation)


def _open(workdir: str):
  path = fs.join(workdir, LOCK_FILE)
  return path, (_Gcs(path) if fs.is_remote(path) else _Local(path))


def _live_holder(workdir: str, path: str, lock) -> dict | None:
  """The holder named in the lock (None when there is none); raises WorkdirLocked when
  that holder is alive. A lock that is not JSON counts as held by someone unknown."""
  saved = lock.read()
  if saved is None:
    return None
  try:
    holder = json.loads(saved)
  except ValueError:
    holder = {}
  if _alive(holder):
    raise WorkdirLocked(_held_message(workdir, path, holder))
  return holder


def _acquire(workdir: str):
  """Takes the lock (process 0); the held lock, or raises WorkdirLocked."""
  path, lock = _open(workdir)
  text = json.dumps(_holder(), indent=2)
  for _ in range(3):  # a holder that vanishes between our create and read: try again
    if lock.create(text):
      return lock
    holder = _live_holder(workdir, path, lock)
    if holder is None:
      continue
    logging.warning("taking over the lock of %s: its holder, %s, is no longer running",
                    workdir, _describe(holder))
    if isinstance(lock, _Gcs):  # the stale object's generation guards the takeover
      lock.generation = lock.blob.generation
    lock.remove()
  raise WorkdirLocked(f"could not take the lock {path}: it keeps changing hands")


def check_free(workdir: str) -> None:
  """Raises WorkdirLocked when a live run holds `workdir` (reads only): a second run is
  refused before it spends minutes loading and compiling. `hold` decides for good."""
  import jax
  if jax.process_index() == 0:
    _live_holder(workdir, *_open(workdir))


def _held_message(workdir: str, path: str, holder: dict) -> str:
  return (f"{workdir} is in use by {_describe(holder)}: one run at a time per workdir. "
          f"Wait for it to finish or stop it, or train in another --workdir; if that run "
          f"is gone (a crashed host), delete {path} and rerun")


def _agree(error: str) -> str:
  """Process 0's outcome on every process of a multi-host run ('' when it holds the lock)."""
  import jax
  if jax.process_count() == 1:
    return error
  import numpy as np
  from jax.experimental import multihost_utils
  encoded = np.zeros(2048, np.uint8)
  raw = error.encode()[:2048]
  encoded[:len(raw)] = np.frombuffer(raw, np.uint8)
  shared = multihost_utils.broadcast_one_to_all(encoded)
  return bytes(np.asarray(shared)).rstrip(b"\0").decode(errors="replace")


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[None]:
  """Holds `workdir`'s lock for the `with` block (process 0 takes it for all); raises
  WorkdirLocked when another run has it. Creates the workdir."""
  import jax
  lock, error = None, ""
  if jax.process_index() == 0:
    try:
      fs.makedirs(workdir)
      lock = _acquire(workdir)
    except WorkdirLocked as e:
      error = str(e)
  error = _agree(error)
  if error:
    raise WorkdirLocked(error)
  try:
    yield
  finally:
    if lock is not None:
      try:
        lock.remove()
      except OSError as e:  # never hide the run's own outcome behind this
        if e.errno != errno.ENOENT:
          logging.warning("could not remove the lock of %s: %s", workdir, e)
