"""One filesystem layer for every path ldm_jax reads or writes: local paths and gs:// alike.

A path is a string (or os.PathLike). A local path goes to `os` / `shutil` exactly as
before; a URL (`gs://bucket/...`, anything with `://`) goes through fsspec's gcsfs, the
backend etils.epath uses for gs:// once `configure_storage` has run, so orbax (which
reads and writes its metadata through epath) and ldm_jax's own files share one client.
orbax's arrays go through tensorstore, the latent cache's ArrayRecord shards through
array_record's bundled google-cloud-cpp: each of the three has its own endpoint setting,
and `configure_storage` derives them all from the standard `STORAGE_EMULATOR_HOST`.

Never `os.path.abspath` a URL: it turns `gs://b/run` into a local `gs:/b/run` folder.
`absolute` and `normalize` here leave URLs alone.

GCS has objects, not folders: a "folder" is a prefix that exists once an object is under
it, `makedirs` creates nothing, and a folder cannot be renamed, only copied and deleted
(`move`). Single-object writes are atomic (an upload becomes visible when complete), which
is what ldm_jax.outputs builds its atomic replacement on.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import posixpath
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Any, Iterator

from absl import logging

EMULATOR_VARIABLE = "STORAGE_EMULATOR_HOST"
# What each storage library needs to reach the emulator (see `storage_settings`).
_EMULATOR_TOKEN = "ldm_jax-emulator"  # any bearer token: emulators do not check it

_configured: dict[str, str] | None = None
_lock = threading.Lock()


# --- Configuration ---------------------------------------------------------------------


def emulator_url() -> str | None:
  """The GCS emulator's base URL from STORAGE_EMULATOR_HOST (a scheme added as the
  Google client libraries do), or None when talking to the real GCS."""
  host = os.environ.get(EMULATOR_VARIABLE, "").strip().rstrip("/")
  if not host:
    return None
  return host if "://" in host else f"http://{host}"


def storage_settings() -> dict[str, str]:
  """The environment variables `configure_storage` sets (unless already set), by library.

  Always:
    EPATH_USE_TF=false        etils.epath (and so orbax) uses fsspec/gcsfs for gs://, not
                              tf.io.gfile: the same client in tests and on a pod, and the
                              one that can reach an emulator (TensorFlow's GCS filesystem
                              has its endpoint compiled in: https://www.googleapis.com).
  With STORAGE_EMULATOR_HOST=URL:
    TENSORSTORE_GCS_HTTP_URL=URL            tensorstore (orbax's array writer)
    GOOGLE_AUTH_TOKEN_FOR_TESTING=...       tensorstore: a fixed bearer token instead of
                                            looking for credentials (metadata server)
    CLOUD_STORAGE_EMULATOR_ENDPOINT=URL     google-cloud-cpp inside array_record (reading
                                            gs:// ArrayRecord files; anonymous there)
    GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false gcsfs: no gRPC storage-control probe of the
                                            bucket type, which emulators do not serve
  gcsfs and google-cloud-storage read STORAGE_EMULATOR_HOST themselves; gcsfs is also told
  to use no credentials there (fsspec config, not an environment variable).
  """
  settings = {"EPATH_USE_TF": "false"}
  url = emulator_url()
  if url:
    settings.update({"TENSORSTORE_GCS_HTTP_URL": url,
                     "GOOGLE_AUTH_TOKEN_FOR_TESTING": _EMULATOR_TOKEN,
                     "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,
                     "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"})
  return settings


def configure_storage() -> dict[str, str]:
  """Sets up every storage library for gs:// (and a GCS emulator, when
  STORAGE_EMULATOR_HOST names one); returns the settings in force. Every command calls it
  first; the functions below call it on their first remote path, so library users need
  not. Variables the user set are kept. Idempotent (re-reads the environment each call).
  """
  global _configured
  with _lock:
    settings = storage_settings()
    for key, value in settings.items():
      os.environ.setdefault(key, value)
    try:  # epath caches whether to use TensorFlow on first use
      from etils.epath import gpath
      gpath._is_tf_installed.cache_clear()  # pylint: disable=protected-access
    except (ImportError, AttributeError):
      pass
    try:  # fsspec is light; gcsfs (heavier) is imported on the first gs:// access
      import fsspec
      gcs = fsspec.config.conf.setdefault("gs", {})
      # Listings are not cached: tensorstore, other hosts and other processes write the
      # same prefixes, and a stale listing would hide a checkpoint or a temporary.
      gcs["use_listings_cache"] = False
      # Under an emulator: no credentials (no metadata-server probe); else gcsfs's default
      # (application default credentials, the TPU VM's service account).
      if emulator_url():
        gcs["token"] = "anon"
      elif gcs.get("token") == "anon":
        del gcs["token"]
      fsspec.config.conf["gcs"] = gcs
    except ImportError:
      pass
    now = {k: os.environ[k] for k in settings}
    if now != _configured:
      _clear_fsspec_instances()  # clients made before take the old settings
    _configured = now
    return dict(_configured)


def _clear_fsspec_instances() -> None:
  """Forgets cached gcsfs clients, so the next one takes the current settings (nothing to
  forget, and nothing imported, before the first remote access)."""
  if "gcsfs" in sys.modules:
    sys.modules["gcsfs"].GCSFileSystem.clear_instance_cache()
  backend = sys.modules.get("etils.epath.backend")
  if backend is not None:
    backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access


def ensure_configured() -> None:
  """configure_storage() unless it ran already (cheap: for every remote access)."""
  if _configured is None:
    configure_storage()


# --- Names -----------------------------------------------------------------------------


def is_remote(path: str | os.PathLike) -> bool:
  """True for URLs (gs://...), False for local paths."""
  return "://" in os.fspath(path)


def path(p: str | os.PathLike):
  """A pathlib.Path for a local path, an etils.epath.Path for a URL (same methods)."""
  text = os.fspath(p)
  if not is_remote(text):
    return Path(text)
  ensure_configured()
  from etils import epath
  return epath.Path(text)


def join(base: str | os.PathLike, *parts: str) -> str:
  base = os.fspath(base)
  return posixpath.join(base, *parts) if is_remote(base) else os.path.join(base, *parts)


def absolute(p: str | os.PathLike) -> str:
  """A local path made absolute (~ expanded); a URL unchanged (it is absolute already)."""
  text = os.fspath(p)
  if not text or is_remote(text):
    return text
  return os.path.abspath(os.path.expanduser(text))


def _split(url: str) -> tuple[str, str]:
  scheme, rest = url.split("://", 1)
  return scheme, rest


def normalize(p: str | os.PathLike) -> str:
  """For comparing places: os.path.realpath of a local path; a URL with `.`, `..`,
  doubled and trailing slashes resolved (`gs://b/x/../y/` -> `gs://b/y`)."""
  text = os.fspath(p)
  if not is_remote(text):
    return os.path.realpath(text)
  scheme, rest = _split(text)
  rest = posixpath.normpath("/" + rest).lstrip("/")
  return f"{scheme}://{rest}"


def is_within(child: str | os.PathLike, parent: str | os.PathLike) -> bool:
  """True when `child` lies strictly inside the folder `parent` (both normalized)."""
  child, parent = normalize(child), normalize(parent)
  sep = "/" if is_remote(parent) else os.sep
  return child.startswith(parent.rstrip(sep) + sep)


def relpath(p: str | os.PathLike, start: str | os.PathLike) -> str:
  p, start = os.fspath(p), os.fspath(start)
  if not is_remote(p):
    return os.path.relpath(p, start)
  return posixpath.relpath(_split(normalize(p))[1], _split(normalize(start))[1])


def bucket(p: str | os.PathLike) -> str:
  """`gs://b` of `gs://b/x/y`."""
  scheme, rest = _split(os.fspath(p))
  return f"{scheme}://{rest.split('/', 1)[0]}"


# --- Remote plumbing -------------------------------------------------------------------


def _fs(url: str):
  """(fsspec filesystem, path without the scheme) of a URL."""
  ensure_configured()
  import fsspec
  return fsspec.core.url_to_fs(url)


def _url(url_like: str, stripped: str) -> str:
  return f"{_split(url_like)[0]}://{stripped.lstrip('/')}"


# --- Queries ---------------------------------------------------------------------------


def exists(p: str | os.PathLike) -> bool:
  p = os.fspath(p)
  if not is_remote(p):
    return os.path.exists(p)
  fs, rp = _fs(p)
  return fs.exists(rp)


def isdir(p: str | os.PathLike) -> bool:
  p = os.fspath(p)
  if not is_remote(p):
    return os.path.isdir(p)
  fs, rp = _fs(p)
  if "/" not in rp.strip("/"):  # a bucket
    return fs.exists(rp)
  return fs.isdir(rp)


def isfile(p: str | os.PathLike) -> bool:
  p = os.fspath(p)
  if not is_remote(p):
    return os.path.isfile(p)
  fs, rp = _fs(p)
  if "/" not in rp.strip("/"):
    return False
  return fs.isfile(rp)


def getsize(p: str | os.PathLike) -> int:
  p = os.fspath(p)
  if not is_remote(p):
    return os.path.getsize(p)
  fs, rp = _fs(p)
  return int(fs.size(rp))


def listdir(p: str | os.PathLike) -> list[str]:
  """The names in a folder (os.listdir; for a URL, the objects and prefixes below it)."""
  p = os.fspath(p)
  if not is_remote(p):
    return os.listdir(p)
  fs, rp = _fs(p)
  if not isdir(p):
    raise FileNotFoundError(f"no folder {p}")
  rp = rp.rstrip("/")
  names = []
  for entry in fs.ls(rp, detail=False):
    entry = entry.rstrip("/")
    if entry != rp:
      names.append(entry.rsplit("/", 1)[-1])
  return sorted(set(names))


def walk(top: str | os.PathLike, followlinks: bool = False
         ) -> Iterator[tuple[str, list[str], list[str]]]:
  """os.walk (top-down; pruning `dirs` in place is honoured), URLs included."""
  top = os.fspath(top)
  if not is_remote(top):
    yield from os.walk(top, followlinks=followlinks)
    return
  fs, rp = _fs(top)
  if not isdir(top):
    return
  for root, dirs, files in fs.walk(rp.rstrip("/"), detail=False):
    yield _url(top, root), dirs, files


def glob(pattern: str, *, folders: bool = False) -> list[str]:
  """Sorted matching files (glob.glob locally, `~` expanded; URLs through gcsfs);
  folders=True also returns matching folders."""
  if not is_remote(pattern):
    import glob as glob_lib
    pattern = os.path.expanduser(pattern)
    return sorted(p for p in glob_lib.glob(pattern) if folders or os.path.isfile(p))
  fs, rp = _fs(pattern)
  found = fs.glob(rp, detail=True)
  return sorted(_url(pattern, name.rstrip("/")) for name, info in found.items()
                if folders or info.get("type") == "file")


# --- Reading and writing ---------------------------------------------------------------


def open(p: str | os.PathLike, mode: str = "r",  # pylint: disable=redefined-builtin
         encoding: str | None = None) -> IO[Any]:
  """builtins.open for a local path (text as utf-8 unless told); a URL through gcsfs
  (seekable for reading; a write becomes visible as a whole on close)."""
  p = os.fspath(p)
  if not is_remote(p):
    if "b" in mode:
      return io.open(p, mode)
    return io.open(p, mode, encoding=encoding or "utf-8")
  fs, rp = _fs(p)
  handle = fs.open(rp, mode.replace("t", "").replace("b", "") + "b")
  if "b" in mode:
    return handle
  return io.TextIOWrapper(handle, encoding=encoding or "utf-8")


def read_bytes(p: str | os.PathLike) -> bytes:
  p = os.fspath(p)
  if not is_remote(p):
    with io.open(p, "rb") as f:
      return f.read()
  fs, rp = _fs(p)
  return fs.cat_file(rp)


def read_text(p: str | os.PathLike, encoding: str = "utf-8") -> str:
  return read_bytes(p).decode(encoding)


def write_bytes(p: str | os.PathLike, data: bytes) -> None:
  """Writes a whole file (not atomic locally; one atomic upload on GCS). Outputs that a
  reader must never see half-written go through ldm_jax.outputs instead."""
  p = os.fspath(p)
  if not is_remote(p):
    with io.open(p, "wb") as f:
      f.write(data)
    return
  fs, rp = _fs(p)
  fs.pipe_file(rp, data)


def write_text(p: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
  write_bytes(p, text.encode(encoding))


def replace_text(p: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
  """Writes a small file that a reader must always find whole: locally a temporary sibling
  renamed over it, on GCS one upload (objects are replaced atomically)."""
  p = os.fspath(p)
  if is_remote(p):
    write_text(p, text, encoding)
    return
  tmp = f"{p}.tmp"
  with io.open(tmp, "w", encoding=encoding) as f:
    f.write(text)
  os.replace(tmp, p)


def append_text(p: str | os.PathLike, text: str) -> None:
  """Appends `text` to a file (created if missing). GCS objects cannot be appended to:
  the object is read and written back whole, so keep such files small and written by one
  process (the trainers' val_metrics.jsonl: process 0)."""
  p = os.fspath(p)
  if not is_remote(p):
    with io.open(p, "a", encoding="utf-8") as f:
      f.write(text)
    return
  old = read_bytes(p) if isfile(p) else b""
  write_bytes(p, old + text.encode("utf-8"))


def makedirs(p: str | os.PathLike) -> None:
  """os.makedirs(exist_ok=True); for a URL only checks that its bucket exists (GCS has
  no folders to create)."""
  p = os.fspath(p)
  if not is_remote(p):
    os.makedirs(p, exist_ok=True)
    return
  if not exists(bucket(p)):
    raise FileNotFoundError(f"cannot write {p}: the bucket {bucket(p)} does not exist (or "
                            "these credentials cannot see it)")


def remove(p: str | os.PathLike) -> None:
  p = os.fspath(p)
  if not is_remote(p):
    os.remove(p)
    return
  fs, rp = _fs(p)
  fs.rm_file(rp)


def rmtree(p: str | os.PathLike, ignore_errors: bool = False) -> None:
  """Deletes a folder (or a file) and everything in it."""
  p = os.fspath(p)
  if not is_remote(p):
    shutil.rmtree(p, ignore_errors=ignore_errors)
    return
  fs, rp = _fs(p)
  try:
    if fs.exists(rp):
      fs.rm(rp.rstrip("/"), recursive=True)
  except OSError:
    if not ignore_errors:
      raise


def _files_below(p: str) -> list[str]:
  """Relative names of every file under the folder `p` ('' for a file)."""
  if not isdir(p):
    return [""]
  if not is_remote(p):
    out = []
    for root, _, files in os.walk(p):
      out += [os.path.relpath(os.path.join(root, f), p) for f in files]
    return sorted(out)
  fs, rp = _fs(p)
  rp = rp.rstrip("/")
  return sorted(posixpath.relpath(f, rp) for f in fs.find(rp))


def copy(src: str | os.PathLike, dst: str | os.PathLike, *, last: tuple[str, ...] = ()
         ) -> None:
  """Copies a file or a folder's files (local or remote, either side; remote to remote
  is a server-side copy). Files whose relative name is in `last` are copied after all
  others: a folder's marker, so a reader that finds it finds a complete folder."""
  src, dst = os.fspath(src), os.fspath(dst)
  names = _files_below(src)
  names = [n for n in names if n not in last] + [n for n in names if n in last]
  pairs = [(join(src, n) if n else src, join(dst, n) if n else dst) for n in names]
  for s, d in pairs:
    _copy_file(s, d)


def _copy_file(s: str, d: str) -> None:
  if not is_remote(s) and not is_remote(d):
    os.makedirs(os.path.dirname(d) or ".", exist_ok=True)
    shutil.copyfile(s, d)
  elif not is_remote(s):
    fs, rd = _fs(d)
    fs.put_file(s, rd)
  elif not is_remote(d):
    os.makedirs(os.path.dirname(d) or ".", exist_ok=True)
    fs, rs = _fs(s)
    fs.get_file(rs, d)
  else:
    fs, rs = _fs(s)
    fs.copy(rs, _fs(d)[1])


def move(src: str | os.PathLike, dst: str | os.PathLike, *, last: tuple[str, ...] = ()
         ) -> None:
  """os.rename between local paths; otherwise copy, then delete the source (on GCS a
  folder cannot be renamed): the source stays whole until the copy is complete."""
  src, dst = os.fspath(src), os.fspath(dst)
  if not is_remote(src) and not is_remote(dst):
    os.rename(src, dst)
    return
  copy(src, dst, last=last)
  if isdir(src):
    rmtree(src)
  else:
    remove(src)


@contextlib.contextmanager
def local_file(p: str | os.PathLike) -> Iterator[str]:
  """A local file name for `p`, for readers that need one (torch.load, safetensors'
  memory map): `p` itself when local, else a temporary download removed afterwards."""
  p = os.fspath(p)
  if not is_remote(p):
    yield p
    return
  folder = tempfile.mkdtemp(prefix="ldm_jax-download-")
  try:
    local = os.path.join(folder, posixpath.basename(p.rstrip("/")) or "file")
    _copy_file(p, local)
    yield local
  finally:
    shutil.rmtree(folder, ignore_errors=True)


# --- TensorBoard -----------------------------------------------------------------------


def metric_writer(logdir: str | os.PathLike, *, just_logging: bool = False,
                  asynchronous: bool = True, collection: str | None = None):
  """clu's default writer (console + TensorBoard event files in `logdir`).

  A local logdir gets exactly `metric_writers.create_default_writer`. A gs:// logdir gets
  the same writers, but the event files are written to a local staging folder and
  uploaded through this module (on flush, on close, and at most every `_SYNC_SECONDS`
  while writing): TensorFlow's summary writer would reach gs:// only through TensorFlow's
  own GCS client, which ignores STORAGE_EMULATOR_HOST and this module's credentials.
  """
  from clu import metric_writers
  logdir = os.fspath(logdir)
  if just_logging or not is_remote(logdir):
    return metric_writers.create_default_writer(logdir, just_logging=just_logging,
                                                asynchronous=asynchronous,
                                                collection=collection)
  if collection is not None:
    logdir = join(logdir, collection)
  writers = [metric_writers.LoggingWriter(collection=collection), _mirrored_writer_class()(logdir)]
  if asynchronous:
    return metric_writers.AsyncMultiWriter(writers)
  return metric_writers.MultiWriter(writers)


_SYNC_SECONDS = 60.0


@functools.cache
def _mirrored_writer_class():
  """MirroredSummaryWriter, defined on first use: clu imports TensorFlow."""
  from clu.metric_writers import SummaryWriter, interface

  class MirroredSummaryWriter(interface.MetricWriter):
    """clu's SummaryWriter on a local staging folder, mirrored to a remote logdir.

    Event files only grow; each sync uploads those that changed since the last one (a whole
    object each time, as TensorFlow's own GCS writer does on flush). Files already in the
    remote logdir (earlier runs, other writers) are never touched.
    """

    def __init__(self, logdir: str):
      self.logdir = logdir
      self._staging = tempfile.mkdtemp(prefix="ldm_jax-tensorboard-")
      self._writer = SummaryWriter(self._staging)
      self._uploaded: dict[str, tuple[int, int]] = {}
      self._last_sync = time.monotonic()

    def _wrote(self) -> None:
      if time.monotonic() - self._last_sync > _SYNC_SECONDS:
        self.flush()

    def write_summaries(self, step, values, metadata=None):
      self._writer.write_summaries(step, values, metadata)
      self._wrote()

    def write_scalars(self, step, scalars):
      self._writer.write_scalars(step, scalars)
      self._wrote()

    def write_images(self, step, images):
      self._writer.write_images(step, images)
      self._wrote()

    def write_videos(self, step, videos):
      self._writer.write_videos(step, videos)
      self._wrote()

    def write_audios(self, step, audios, *, sample_rate):
      self._writer.write_audios(step, audios, sample_rate=sample_rate)
      self._wrote()

    def write_texts(self, step, texts):
      self._writer.write_texts(step, texts)
      self._wrote()

    def write_histograms(self, step, arrays, num_buckets=None):
      self._writer.write_histograms(step, arrays, num_buckets)
      self._wrote()

    def write_hparams(self, hparams):
      self._writer.write_hparams(hparams)
      self._wrote()

    def _sync(self) -> None:
      for root, _, files in os.walk(self._staging):
        for name in files:
          local = os.path.join(root, name)
          stat = os.stat(local)
          key = (stat.st_size, stat.st_mtime_ns)
          if self._uploaded.get(local) == key:
            continue
          rel = os.path.relpath(local, self._staging).replace(os.sep, "/")
          _copy_file(local, join(self.logdir, rel))
          self._uploaded[local] = key
      self._last_sync = time.monotonic()

    def flush(self) -> None:
      if self._staging is None:
        return
      self._writer.flush()
      try:
        self._sync()
      except OSError as e:  # metrics must not kill a run: the next sync retries
        logging.warning("could not upload TensorBoard files to %s: %s", self.logdir, e)

    def close(self) -> None:
      if self._staging is None:
        return
      self._writer.close()
      try:
        self._sync()
      finally:
        shutil.rmtree(self._staging, ignore_errors=True)
        self._staging = None

  return MirroredSummaryWriter
