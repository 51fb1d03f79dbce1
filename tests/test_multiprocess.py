"""jax.distributed on one machine: 2 processes give the parameters of 1 process."""

import os
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "launch"))
from local_multiprocess import launch  # noqa: E402
from conftest import cpu_env

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "multiprocess_step.py")


def test_two_processes_match_one(tmp_path):
  env = cpu_env()
  results = launch(2, [f"--out={tmp_path / 'two.npz'}"], devices_per_process=1,
                   program=(SCRIPT,), env=env, timeout=600)
  for r in results:
    assert r.returncode == 0, r.stdout[-3000:]
  single_env = cpu_env(devices=2)
  single = subprocess.run([sys.executable, SCRIPT, f"--out={tmp_path / 'one.npz'}"],
                          env=single_env, capture_output=True, text=True, timeout=600)
  assert single.returncode == 0, single.stdout[-2000:] + single.stderr[-3000:]
  assert "done 0 2" in single.stdout and "done 1 2" in results[1].stdout

  two, one = np.load(tmp_path / "two.npz"), np.load(tmp_path / "one.npz")
  assert sorted(two.files) == sorted(one.files) and len(one.files) > 10
  for key in one.files:
    np.testing.assert_array_equal(two[key], one[key], err_msg=key)
