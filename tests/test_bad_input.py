"""Every row of the README's "Bad input" table, run as the command it names: exit status 1,
exactly the row's one `error:` line on stderr, no traceback, and no workdir.

One process per row. Each row fails in its checks, before anything is compiled; the
inputs the rows name in capitals are made here once (a diffusers UNet folder, ArrayRecord
files, an image folder, a tiny SD pipeline).
"""

import io
import os
import pathlib
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import cpu_env

REPO = pathlib.Path(__file__).resolve().parent.parent


def readme_rows() -> list[tuple[str, str]]:
  """(input, expected line) of each row of the README's "Bad input" table."""
  text = (REPO / "README.md").read_text()
  section = text.split("\n### Bad input\n", 1)[1].split("\n#", 1)[0]
  rows = []
  for line in section.splitlines():
    m = re.fullmatch(r"\| `([^`]+)`[^|]*\| `(.*)` \|", line.strip())
    if m:
      rows.append((m[1], m[2]))
  return rows


ROWS = readme_rows()


def _png(rng) -> bytes:
  encoded = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (40, 40, 3), np.uint8)).save(encoded, format="PNG")
  return encoded.getvalue()


def _array_record(path, records) -> str:
  from array_record.python.array_record_module import ArrayRecordWriter
  writer = ArrayRecordWriter(str(path), "group_size:1")
  for record in records:
    writer.write(record)
  writer.close()
  return str(path)


def _unet_folder(root) -> str:
  from diffusers import UNet2DModel
  UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
              block_out_channels=(8, 16), down_block_types=("DownBlock2D",) * 2,
              up_block_types=("UpBlock2D",) * 2, norm_num_groups=4).save_pretrained(
                  str(root / "unet"))
  return str(root / "unet")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  """The capitalized names of the table -> the paths made for them."""
  from flax import serialization
  root = tmp_path_factory.mktemp("bad_input")
  rng = np.random.default_rng(0)
  made = {"EMPTY": str(root / "empty")}
  os.makedirs(made["EMPTY"])
  made["JUNK"] = _array_record(root / "junk.array_record",
                               [b"not an image %d" % i for i in range(4)])
  made["UNCAPTIONED"] = _array_record(
      root / "uncaptioned.array_record",
      [serialization.msgpack_serialize({"image": _png(rng), "text": "a photo"})] * 4)
  os.makedirs(root / "images")
  for i in range(4):
    (root / "images" / f"{i}.png").write_bytes(_png(rng))
  made["IMAGES"] = str(root / "images")
  # torch and diffusers: the README's test command installs both, so a missing one fails
  # the rows that need them (as the other SD tests do) rather than skipping them.
  made["UNET"] = _unet_folder(root)
  from sd_fixtures import build_diffusers_pipeline
  made["PIPELINE"] = build_diffusers_pipeline(root)[1]
  return made


def _command(row: str, inputs: dict, workdir) -> tuple[list[str], dict]:
  """The argv and environment of a row's input."""
  words = shlex.split(row)
  env = {}
  while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):
    key, value = words.pop(0).split("=", 1)
    env[key] = value
  for name in _names(row):
    words = [w.replace(name, inputs[name]) for w in words]
  devices = re.search(r"device_count=(\d+)", env.pop("XLA_FLAGS", ""))
  argv = [sys.executable, "-m", "ldm_jax.main", *words, f"--workdir={workdir}"]
  return argv, cpu_env(devices=int(devices[1]) if devices else None, **env)


def _names(text: str) -> list[str]:
  return [n for n in ("UNCAPTIONED", "PIPELINE", "IMAGES", "EMPTY", "UNET", "JUNK")
          if re.search(rf"\b{n}\b", text)]


def _pattern(expected: str, inputs: dict) -> str:
  """The expected line as a regex: `...` matches anything, the names their paths."""
  parts = []
  for piece in expected.split("..."):
    piece = re.escape(piece)
    for name in _names(expected):
      piece = re.sub(rf"\b{name}\b", re.escape(inputs[name]).replace("\\", "\\\\"), piece)
    parts.append(piece)
  return ".*".join(parts)


def test_the_table_has_every_case():
  assert len(ROWS) >= 12
  assert all(expected.startswith("error: ") for _, expected in ROWS)


@pytest.mark.parametrize("row, expected", ROWS, ids=[r[:60] for r, _ in ROWS])
def test_bad_input_gives_its_line(row, expected, inputs, tmp_path):
  workdir = tmp_path / "W"
  argv, env = _command(row, inputs, workdir)
  proc = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert re.fullmatch(_pattern(expected, inputs), errors[0]), errors[0]
  assert not workdir.exists()


def test_verbose_shows_the_traceback(tmp_path):
  """--verbose: the same error as a traceback, for a bug report."""
  proc = subprocess.run(
      [sys.executable, "-m", "ldm_jax.main", "--config=configs/kl_f8.py:tiny",
       "--config.data.source=hf", f"--workdir={tmp_path / 'W'}", "--verbose"],
      env=cpu_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1 and "Traceback" in proc.stderr
  assert "ValueError: unknown data.source 'hf'" in proc.stderr
  assert not (tmp_path / "W").exists()
