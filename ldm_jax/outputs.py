"""The one place ldm_jax writes its outputs, and the rules that keep it from deleting yours.

Exports, the latent cache, evaluation reports, reference statistics, sample grids and
converted weights all go through `atomic_path` (or `prepare_directory` for a folder that
is filled piece by piece). The rules, checked by `check_target` before any expensive work:

- A missing path is fine; its nearest existing ancestor must be a writable folder.
- A training workdir (anything holding `checkpoints/`) is never a target, not even with
  --overwrite: replacing it would delete the run.
- An existing folder or file is replaced only when ldm_jax wrote it as the same kind of
  output (its marker says so, see below), when a folder is empty, or with overwrite=True
  (the commands' --overwrite). Anything else is refused with an `OutputError` saying what
  is there and how to proceed.

Markers, one key name everywhere (`ldm_jax_output`, the value is the kind):
  folder          `.ldm_jax_output.json`: {"ldm_jax_output": kind, "files": [top-level names]}
                  ("files" is absent for folders filled piece by piece: the latent cache)
  .safetensors    a metadata entry
  .json           a top-level key
  .md             a first line `<!-- ldm_jax_output: kind -->`
  .png            a tEXt chunk
  .npz            an entry holding the kind as a 0-d string array
Files of a format without room for a marker (the cache's .array_record shards) count as
the kind their folder's marker names. Exports written before markers existed are
recognised by their shape (see `_legacy`), so an existing `W/export` keeps being replaced.

Replacing is atomic: the new output is written to a temporary sibling
(`.NAME.ldm_jax-tmp-HOST-PID-XXXX/NAME`) and renamed into place once complete; a folder it
replaces is moved aside first and deleted only after the new one is in place. Any exception
removes the temporary; temporaries left by a killed process are removed by the next write
of the same target (only those of this host whose process is gone).

gs:// targets (any URL) follow the same rules through ldm_jax.fs. The body writes to a
local staging path, so every writer (safetensors, PIL, ArrayRecord) works unchanged; then
a file is uploaded in one request, which GCS makes visible only when complete: a reader
sees the old file or the new one. GCS cannot rename a folder, so a folder is published
through a temporary sibling folder (the same `.NAME.ldm_jax-tmp-HOST-PID-XXXX`):
`NAME/` is uploaded there first; an output it replaces is copied to `.previous/`,
`.previous-done` is written, and only then is the old one deleted (its marker first) and
the new one copied into place, its marker last, so a folder with a marker is complete.
The old output survives until the new one is complete: a process killed on the way
leaves the temporary, and the next write of the target puts the old output back (or, if
the target was absent, removes the partial copy) before going on.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import secrets
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Iterator

from absl import logging

from ldm_jax import fs

MARKER_KEY = "ldm_jax_output"
MARKER_FILE = ".ldm_jax_output.json"
_TMP_TAG = ".ldm_jax-tmp-"
_PREVIOUS = ".previous"  # inside a temporary: the output being replaced, until the swap
_PREVIOUS_DONE = ".previous-done"  # remote: .previous is complete, the old one may go
_FRESH = ".fresh"  # remote: the target was absent when the new one was copied into place

AUTOENCODER = "autoencoder"  # diffusers folder or CompVis .safetensors (convert.autoencoder)
UNET = "unet"  # diffusers folder or CompVis .safetensors (convert.unet)
LDM = "ldm"  # unet/ + vae/ (+ cond/) folder or one CompVis .safetensors (train.export)
LATENT_CACHE = "latent_cache"  # a folder of per-host shards (data.latents)
EVAL_REPORT = "eval_report"  # W/eval/step_N.json and .md (eval.workdir)
REFERENCE_STATS = "reference_stats"  # mu / sigma .npz (eval.fid)
SAMPLES = "samples"  # PNG grids (the sampling command, the trainers' images/)
WEIGHTS = "weights"  # plain .safetensors from converters (LPIPS, Inception) and tests
_FILLED = {LATENT_CACHE}  # folders written into piece by piece (`prepare_directory`)
KINDS = {AUTOENCODER: "autoencoder export", UNET: "UNet export", LDM: "LDM export",
         LATENT_CACHE: "latent cache", EVAL_REPORT: "evaluation report",
         REFERENCE_STATS: "reference statistics file", SAMPLES: "sample grid",
         WEIGHTS: "weights file"}


def _a(kind: str) -> str:
  return ("an " if kind in (AUTOENCODER, LDM, EVAL_REPORT) else "a ") + KINDS[kind]


class OutputError(ValueError):
  """A target ldm_jax will not write: what is there, why, and what to do instead."""


def _fix(overwrite_hint: bool = True) -> str:
  return ("choose another path, or pass --overwrite (overwrite=True) to replace it"
          if overwrite_hint else "choose another path")


# --- Reading markers -------------------------------------------------------------------


def _is_temp(name: str) -> bool:
  return _TMP_TAG in name


def _entries(folder: Path) -> set[str]:
  """A folder's top-level names, without ldm_jax's own temporaries."""
  return {n for n in fs.listdir(folder) if not _is_temp(n)}


def _folder_marker(folder: Path) -> dict | None:
  try:
    marker = json.loads((fs.path(folder) / MARKER_FILE).read_text())
  except (OSError, ValueError):
    return None
  return marker if isinstance(marker, dict) and marker.get(MARKER_KEY) in KINDS else None


def _sniff(path: Path) -> tuple[str | None, Any]:
  """(format, parsed head) of an existing file by its content, not its name; format None
  for formats without a marker (or unreadable files)."""
  try:
    with fs.open(path, "rb") as f:
      head = f.read(8)
      if head.startswith(b"\x89PNG"):
        return "png", None
      if head.startswith(b"PK"):
        return "npz", None
      if head.startswith(b"<!--"):
        return "md", (head + f.readline(200)).decode("utf-8", "replace")
      if len(head) == 8 and 0 < int.from_bytes(head, "little") < 100_000_000:
        body = f.read(int.from_bytes(head, "little"))
        if body.startswith(b"{"):
          header = json.loads(body)
          metadata = header.get("__metadata__") if isinstance(header, dict) else None
          return "safetensors", metadata if isinstance(metadata, dict) else {}
      if head.lstrip().startswith(b"{") and fs.getsize(path) < 50_000_000:
        f.seek(0)
        return "json", json.loads(f.read())
  except (OSError, ValueError, UnicodeDecodeError):
    pass
  return None, None


def _file_marker(path: Path) -> tuple[str | None, str | None]:
  """(format, kind its marker names) of an existing file."""
  fmt, parsed = _sniff(path)
  kind = None
  try:
    if fmt in ("safetensors", "json") and isinstance(parsed, dict):
      kind = parsed.get(MARKER_KEY)
    elif fmt == "md":
      m = re.match(rf"<!-- {MARKER_KEY}: (\w+) -->", parsed)
      kind = m and m[1]
    elif fmt == "png":
      from PIL import Image
      with fs.open(path, "rb") as handle, Image.open(handle) as image:
        kind = image.info.get(MARKER_KEY)
    elif fmt == "npz":
      import numpy as np
      with fs.open(path, "rb") as handle, np.load(handle, allow_pickle=False) as f:
        kind = str(f[MARKER_KEY]) if MARKER_KEY in f.files else None
  except Exception:  # pylint: disable=broad-except  # an unreadable file carries no marker
    kind = None
  return fmt, kind if kind in KINDS else None


def output_kind(path: str | os.PathLike) -> str | None:
  """The kind of output ldm_jax wrote at `path` (its marker), or None."""
  path = fs.path(path)
  if path.is_dir():
    marker = _folder_marker(path)
    return marker[MARKER_KEY] if marker else None
  if path.is_file():
    fmt, kind = _file_marker(path)
    return kind if fmt is not None else output_kind(path.parent)  # e.g. a cache's shards
  return None


# Exports written before markers existed. Only shapes no other tool writes count: diffusers'
# own save_pretrained puts `_diffusers_version` into config.json, ldm_jax never did.
_DIFFUSERS_CLASSES = {AUTOENCODER: ("AutoencoderKL", "VQModel"), UNET: ("UNet2DConditionModel",)}
_SPEC_KEYS = {AUTOENCODER: "ldm_jax.autoencoder_spec", UNET: "ldm_jax.unet_spec"}  # convert.*
_SHARD = re.compile(r".+-\d{5}-of-\d{5}\.array_record$")  # data.latents.shard_path


def _legacy_diffusers(folder: Path, kind: str) -> bool:
  if _entries(folder) != {"config.json", "diffusion_pytorch_model.safetensors"}:
    return False
  try:
    config = json.loads((folder / "config.json").read_text())
  except (OSError, ValueError):
    return False
  return (isinstance(config, dict) and "_diffusers_version" not in config
          and config.get("_class_name") in _DIFFUSERS_CLASSES[kind])


def _ours_or_legacy_folder(folder: Path, kind: str) -> bool:
  marker = _folder_marker(folder)
  if marker:
    return marker[MARKER_KEY] == kind
  return folder.is_dir() and _legacy(folder, kind)


def _legacy(path: Path, kind: str) -> bool:
  if path.is_dir():
    names = _entries(path)
    if kind in _DIFFUSERS_CLASSES:
      return _legacy_diffusers(path, kind)
    if kind == LDM:
      cond = path / "cond"
      return ({"unet", "vae"} <= names <= {"unet", "vae", "cond"}
              and _ours_or_legacy_folder(path / "unet", UNET)
              and _ours_or_legacy_folder(path / "vae", AUTOENCODER)
              and (not cond.exists() or (cond.is_dir() and _entries(cond) <= {
                  "model.safetensors", "config.json", MARKER_FILE})))
    if kind == LATENT_CACHE:
      return bool(names) and all(_SHARD.match(n) for n in names)
    return False
  fmt, parsed = _sniff(path)
  if fmt == "safetensors" and kind in _SPEC_KEYS:
    return _SPEC_KEYS[kind] in parsed
  if fmt == "safetensors" and kind == WEIGHTS:  # convert.inception_weights' own metadata
    return parsed.get("source") == "FID InceptionV3 (TF 2015-12-05)"
  if kind == EVAL_REPORT and fmt == "json":
    return isinstance(parsed, dict) and {"step", "metrics", "split", "weights"} <= set(parsed)
  if kind == EVAL_REPORT and path.suffix == ".md":
    try:
      with fs.open(path, "r", encoding="utf-8") as f:
        first = f.readline(400)
    except (OSError, UnicodeDecodeError):
      return False
    return re.match(r"Step \d+, .* \(\w+ weights\)$", first.rstrip("\n")) is not None
  if kind == REFERENCE_STATS and fmt == "npz":
    import numpy as np
    try:
      with fs.open(path, "rb") as handle, np.load(handle, allow_pickle=False) as f:
        return set(f.files) == {"mu", "sigma", "num_examples"}  # what save_stats wrote
    except Exception:  # pylint: disable=broad-except
      return False
  return False


# --- Checking a target -----------------------------------------------------------------


def _is_training_dir(folder: Path) -> bool:
  return (folder / "checkpoints").is_dir() or (
      folder.name == "checkpoints" and (folder.parent / "config.json").is_file())


def _training_dir_below(folder: Path, depth: int = 3) -> Path | None:
  """A training workdir inside `folder` (a few levels deep), which --overwrite must not
  delete either."""
  for root, dirs, _ in fs.walk(folder):
    root_path = fs.path(root)
    if _is_training_dir(root_path):
      return root_path
    if len(root_path.relative_to(folder).parts) >= depth:
      dirs.clear()
    dirs[:] = [d for d in dirs if not _is_temp(d)]
  return None


def _describe(names: set[str]) -> str:
  shown = sorted(names)[:5]
  return ", ".join(shown) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _lexists(path) -> bool:
  return fs.exists(path) if fs.is_remote(path) else os.path.lexists(path)


def _check_creatable(path: Path) -> None:
  if fs.is_remote(path):
    _check_creatable_remote(path)
    return
  ancestor = path.parent
  while not os.path.lexists(ancestor) and ancestor != ancestor.parent:
    ancestor = ancestor.parent
  if not ancestor.is_dir():
    raise OutputError(f"cannot create {path}: {ancestor} is a file, not a folder")
  if not os.access(ancestor, os.W_OK | os.X_OK):
    raise OutputError(f"cannot create {path}: no permission to write in {ancestor}")


def _check_creatable_remote(path) -> None:
  """The bucket exists and no ancestor is a file (permissions show only when writing)."""
  bucket = fs.bucket(path)
  if not fs.exists(bucket):
    raise OutputError(f"cannot create {path}: the bucket {bucket} does not exist (or these "
                      "credentials cannot see it)")
  ancestor = path.parent
  while len(os.fspath(ancestor)) > len(bucket):
    if fs.isfile(ancestor):
      raise OutputError(f"cannot create {path}: {ancestor} is a file, not a folder")
    ancestor = ancestor.parent


def check_target(path: str | os.PathLike, kind: str, *, overwrite: bool = False) -> Path:
  """Raises OutputError unless a `kind` output may be written at `path` (see the module
  docstring); returns it as a Path. Reads only: call it before any expensive work. (On
  gs:// it first repairs a replacement that a killed ldm_jax process of this host left
  half done, as the next write would: locally such a state cannot be seen, a rename being
  atomic; on GCS the target would look half foreign.)"""
  if kind not in KINDS:
    raise ValueError(f"unknown output kind {kind!r}; one of {', '.join(KINDS)}")
  path = fs.path(path)
  if fs.is_remote(path):
    _remove_stale(path)
  label = _a(kind)
  if not _lexists(path):
    _check_creatable(path)
    return path
  if path.is_dir():
    if _is_training_dir(path):
      example = f", e.g. {path / 'export' / kind}" if kind in (AUTOENCODER, UNET, LDM) else ""
      raise OutputError(
          f"{path} is a training workdir (it holds checkpoints/); an output never replaces "
          f"it, not even with --overwrite: {_fix(False)}{example}")
    marker = _folder_marker(path)
    names = _entries(path) - {MARKER_FILE}
    foreign = False  # replacing what ldm_jax did not write (only with overwrite)
    if marker and marker[MARKER_KEY] == kind:
      extra = names - set(marker.get("files", names))
      if extra and not overwrite:
        raise OutputError(f"{path} is an ldm_jax {KINDS[kind]} but also holds what ldm_jax "
                          f"did not write there ({_describe(extra)}): move that out, or "
                          f"{_fix()}")
      foreign = bool(extra)
    elif not names or _legacy(path, kind):
      pass
    elif not overwrite:
      what = (f"an ldm_jax {KINDS[marker[MARKER_KEY]]}, not {label}" if marker else
              f"{len(names)} {'entry' if len(names) == 1 else 'entries'} ldm_jax did not "
              f"write ({_describe(names)})")
      if kind in _FILLED:
        raise OutputError(f"{path} already exists and holds {what}: choose another path, "
                          f"or pass --overwrite (overwrite=True) to write {label} into it "
                          "(what is there stays, same-named pieces are replaced)")
      raise OutputError(f"{path} already exists and holds {what}; writing {label} there "
                        f"would replace all of it: {_fix()}")
    else:
      foreign = True
    if foreign and kind not in _FILLED:  # replaced whole: not if a run is inside
      inner = _training_dir_below(path)
      if inner is not None:
        raise OutputError(f"{path} holds the training workdir {inner}; replacing it would "
                          f"delete that run, so even --overwrite is refused: {_fix(False)}")
  else:
    fmt, found = _file_marker(path)
    ours = found == kind or (fmt is None and output_kind(path.parent) == kind)
    if not (ours or _legacy(path, kind) or overwrite):
      what = f"an ldm_jax {KINDS[found]}" if found else "a file ldm_jax did not write"
      raise OutputError(f"{path} already exists and is {what}, not {label}: {_fix()}")
  if not fs.is_remote(path) and not os.access(path.parent, os.W_OK | os.X_OK):
    raise OutputError(f"cannot replace {path}: no permission to write in {path.parent}")
  return path


# --- Writing ---------------------------------------------------------------------------


def _owner() -> str:
  host = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"
  return f"{host}-{os.getpid()}"


_TEMP = re.compile(rf"^\.(?P<name>.+){re.escape(_TMP_TAG)}(?P<host>.+)-(?P<pid>\d+)-[^-]+$")


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's process
    return True
  except (OverflowError, ValueError):  # not a pid this system can have
    return False
  return True


def _remove_stale(path: Path) -> None:
  """Removes temporaries of `path` left by killed processes of this host; puts back an
  output that was moved aside when the process died mid-swap."""
  host = _owner().rsplit("-", 1)[0]
  if fs.is_remote(path):
    _remove_stale_remote(path, host)
    return
  try:
    siblings = list(path.parent.iterdir())
  except OSError:
    return
  for tmp in siblings:
    m = _TEMP.match(tmp.name)
    if not m or m["name"] != path.name or m["host"] != host or _alive(int(m["pid"])):
      continue
    previous = tmp / _PREVIOUS
    if os.path.lexists(previous) and not os.path.lexists(path):
      os.rename(previous, path)
      logging.warning("restored %s, moved aside by a process that died replacing it", path)
    logging.info("removing %s, left by a process that died writing %s", tmp, path)
    shutil.rmtree(tmp, ignore_errors=True)


def _complete_remote(path) -> bool:
  """A remote output every byte of which is in place: a file (uploads are atomic) or a
  folder whose marker (copied last) is there."""
  return fs.isfile(path) or _folder_marker(path) is not None


def _remove_stale_remote(path, host: str) -> None:
  """`_remove_stale` for a remote target, following the protocol of `_publish_remote`."""
  pattern = fs.join(os.fspath(path.parent), f".{glob.escape(path.name)}{_TMP_TAG}*")
  try:
    siblings = fs.glob(pattern, folders=True)
  except OSError:
    return
  target = os.fspath(path)
  for tmp in siblings:
    m = _TEMP.match(tmp.rstrip("/").rsplit("/", 1)[-1])
    if not m or m["name"] != path.name or m["host"] != host or _alive(int(m["pid"])):
      continue
    previous = fs.join(tmp, _PREVIOUS)
    if fs.exists(fs.join(tmp, _PREVIOUS_DONE)) and not _complete_remote(target):
      _delete_remote(target)
      fs.copy(previous, target, last=(MARKER_FILE,))
      logging.warning("restored %s, moved aside by a process that died replacing it", path)
    elif fs.exists(fs.join(tmp, _FRESH)) and _lexists(target) and not _complete_remote(target):
      _delete_remote(target)  # a partial copy of an output that never completed
    logging.info("removing %s, left by a process that died writing %s", tmp, path)
    fs.rmtree(tmp, ignore_errors=True)


def _delete_remote(target: str) -> None:
  """Deletes a remote output, a folder's marker first: from then on it reads as
  incomplete, never as whole."""
  if fs.isdir(target):
    marker = fs.join(target, MARKER_FILE)
    if fs.exists(marker):
      fs.remove(marker)
    fs.rmtree(target)
  elif fs.exists(target):
    fs.remove(target)


def _publish_remote(staged: Path, path) -> None:
  """Puts the complete local output `staged` at the remote `path` (see the module
  docstring): a file over a file (or nothing) in one upload, anything else through a
  temporary sibling folder, the old output kept until the new one is complete."""
  target = os.fspath(path)
  if not staged.is_dir() and not fs.isdir(target):
    fs.copy(staged, target)  # one upload: the object appears complete, or not at all
    return
  container = fs.join(os.fspath(path.parent),
                      f".{path.name}{_TMP_TAG}{_owner()}-{secrets.token_hex(4)}")
  new, previous = fs.join(container, path.name), fs.join(container, _PREVIOUS)
  try:
    fs.copy(staged, new, last=(MARKER_FILE,))
    moved = fs.exists(target)
    if moved:
      fs.copy(target, previous, last=(MARKER_FILE,))
      fs.write_text(fs.join(container, _PREVIOUS_DONE), "")
      _delete_remote(target)
    else:
      fs.write_text(fs.join(container, _FRESH), "")
    try:
      fs.copy(new, target, last=(MARKER_FILE,))
    except BaseException:
      _delete_remote(target)
      if moved:
        fs.copy(previous, target, last=(MARKER_FILE,))
      raise
  finally:
    fs.rmtree(container, ignore_errors=True)


def _write_marker(folder: Path, kind: str, files: list[str] | None) -> None:
  marker: dict[str, Any] = {MARKER_KEY: kind}
  if files is not None:
    marker["files"] = sorted(files)
  if fs.is_remote(folder):  # one object written whole: atomic on GCS
    fs.write_text(fs.join(os.fspath(folder), MARKER_FILE), json.dumps(marker) + "\n")
    return
  tmp = folder / f".{MARKER_FILE}{_TMP_TAG}{_owner()}-x"
  tmp.write_text(json.dumps(marker) + "\n")
  os.replace(tmp, folder / MARKER_FILE)


def _check_written(tmp: Path, path: Path, kind: str) -> None:
  """Every output carries its marker: a writer that forgot it is a bug, caught here."""
  if not os.path.lexists(tmp):
    raise RuntimeError(f"nothing was written for {path}")
  if tmp.is_dir():
    _write_marker(tmp, kind, [n for n in os.listdir(tmp) if not _is_temp(n)])
    return
  fmt, found = _file_marker(tmp)
  if fmt is not None and found != kind:
    raise RuntimeError(f"the {fmt} writer of {path} left out the {kind!r} marker")
  if fmt is None and output_kind(path.parent) != kind:
    raise RuntimeError(f"{path}: a file without a marker must go into a folder made by "
                       f"prepare_directory(..., {kind!r})")


def _swap(tmp: Path, path: Path) -> None:
  if not os.path.lexists(path) or (os.path.isfile(path) and not tmp.is_dir()
                                   and not path.is_symlink()):
    os.replace(tmp, path)  # a file over a file (or nothing): one atomic rename
    return
  previous = tmp.parent / _PREVIOUS
  os.rename(path, previous)  # a folder (or a link) cannot be renamed over: move it aside
  try:
    os.rename(tmp, path)
  except BaseException:
    os.rename(previous, path)
    raise
  # `previous` goes with the temporary (a link is unlinked, never followed)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, kind: str, *, overwrite: bool = False
                ) -> Iterator[Path]:
  """Yields a temporary path (same name, hidden sibling folder) to write a `kind` output
  to; once the body completes it replaces `path`. Checks `path` first (`check_target`).

  The body writes one file (carrying its marker: use the writers below, or
  convert.files.write_safetensors) or makes the yielded path a folder (its marker is
  added here). On any exception nothing at `path` changes and the temporary is removed;
  an OSError naming the temporary is re-raised as an OutputError naming `path`.
  """
  path = check_target(path, kind, overwrite=overwrite)
  if fs.is_remote(path):
    with _atomic_remote(path, kind) as tmp:
      yield tmp
    return
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise OutputError(f"cannot create the folder {path.parent}: {e.strerror or e}") from None
  _remove_stale(path)
  try:
    container = Path(tempfile.mkdtemp(prefix=f".{path.name}{_TMP_TAG}{_owner()}-",
                                      dir=path.parent))
  except OSError as e:
    raise OutputError(f"cannot write in {path.parent}: {e.strerror or e}") from None
  tmp = container / path.name
  try:
    with _scratch_errors(container, path):
      yield tmp
      _check_written(tmp, path, kind)
      _honour_umask(tmp)
      _swap(tmp, path)
  finally:
    shutil.rmtree(container, ignore_errors=True)


def _umask() -> int:
  """The process's umask. Linux shows it in /proc; elsewhere os.umask is the only way to
  read it, by setting it for a moment (a file another thread creates then gets 0o022)."""
  try:
    with open("/proc/self/status", encoding="ascii") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except (OSError, ValueError):
    pass
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def _honour_umask(tmp: Path) -> None:
  """Gives the written files the mode a plain open() gives, 0o666 & ~umask: some writers
  create theirs 0600 (safetensors' save_file does), and an export that only its writer can
  read is no use to the PyTorch user it is for. Folders come from mkdir: already right."""
  mode = 0o666 & ~_umask()
  files = [tmp] if not tmp.is_dir() else [
      Path(root, name) for root, _, names in os.walk(tmp) for name in names]
  for f in files:
    if f.is_file() and not f.is_symlink():
      os.chmod(f, mode)


@contextlib.contextmanager
def _scratch_errors(scratch: Path, path) -> Iterator[None]:
  """An OSError about a file in the scratch folder becomes an OutputError naming the
  target (the scratch path means nothing to the user); others pass through."""
  try:
    yield
  except OSError as e:
    names = [str(n) for n in (e.filename, e.filename2) if n is not None]
    if any(n.startswith(str(scratch)) for n in names):
      raise OutputError(f"could not write {path}: {e.strerror or e}") from e
    raise


@contextlib.contextmanager
def _atomic_remote(path, kind: str) -> Iterator[Path]:
  """atomic_path for a remote `path` (checked, and so repaired, by check_target): the
  body writes to a local staging path."""
  staging = Path(tempfile.mkdtemp(prefix=f"ldm_jax-staging-{path.name}-"))
  tmp = staging / path.name
  try:
    with _scratch_errors(staging, path):
      yield tmp
      _check_written(tmp, path, kind)
      _publish_remote(tmp, path)
  finally:
    shutil.rmtree(staging, ignore_errors=True)


def prepare_directory(path: str | os.PathLike, kind: str, *, overwrite: bool = False) -> Path:
  """A folder filled piece by piece (each piece through `atomic_path`), possibly by many
  processes: checked, created and marked once; an existing one of the same kind is reused
  as it is. With overwrite=True a foreign folder is written into, never emptied."""
  path = check_target(path, kind, overwrite=overwrite)
  try:
    if fs.is_remote(path):
      fs.makedirs(path)
    else:
      path.mkdir(parents=True, exist_ok=True)
    marker = _folder_marker(path)
    if not marker or marker[MARKER_KEY] != kind or "files" in marker:
      _write_marker(path, kind, None)
  except OSError as e:
    raise OutputError(f"cannot create {path}: {e.strerror or e}") from None
  return path


def write_json(path: str | os.PathLike, obj: dict, kind: str, *,
               overwrite: bool = False) -> None:
  with atomic_path(path, kind, overwrite=overwrite) as tmp:
    tmp.write_text(json.dumps({**obj, MARKER_KEY: kind}, indent=2) + "\n", encoding="utf-8")


def write_markdown(path: str | os.PathLike, text: str, kind: str, *,
                   overwrite: bool = False) -> None:
  with atomic_path(path, kind, overwrite=overwrite) as tmp:
    tmp.write_text(f"<!-- {MARKER_KEY}: {kind} -->\n{text}", encoding="utf-8")


def write_png(path: str | os.PathLike, image, kind: str, *, overwrite: bool = False) -> None:
  """A uint8 HxWx3 (or HxW) image as PNG."""
  from PIL import Image, PngImagePlugin
  info = PngImagePlugin.PngInfo()
  info.add_text(MARKER_KEY, kind)
  with atomic_path(path, kind, overwrite=overwrite) as tmp:
    Image.fromarray(image).save(tmp, format="PNG", pnginfo=info)


def write_npz(path: str | os.PathLike, arrays: dict, kind: str, *,
              overwrite: bool = False) -> None:
  import numpy as np
  with atomic_path(path, kind, overwrite=overwrite) as tmp:
    with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name
      np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()},
               **{MARKER_KEY: np.asarray(kind)})


def safetensors_metadata(kind: str) -> dict[str, str]:
  """The metadata entry that marks a .safetensors file (convert.files.write_safetensors)."""
  return {MARKER_KEY: kind}
