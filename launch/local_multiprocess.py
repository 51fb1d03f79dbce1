"""Run N ldm_jax processes on this machine as one multi-process JAX job (CPU).

  python launch/local_multiprocess.py --num_processes=2 -- \
      --config=configs/kl_f8.py:tiny --workdir=/tmp/run

Each process gets `--coordinator_address=127.0.0.1:PORT --num_processes=N
--process_id=i` and, unless set, `--xla_force_host_platform_device_count` devices. This is
how the tests check that multi-host code gives the same result as one process.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import socket


def _free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def launch(num_processes: int, args: list[str], devices_per_process: int = 1,
           program: tuple[str, ...] = ("-m", "ldm_jax.main"), env: dict | None = None,
           timeout: float | None = None) -> list[subprocess.CompletedProcess]:
  """Starts the processes, waits for all, and returns their results (output captured)."""
  port = _free_port()
  base_env = dict(os.environ if env is None else env)
  base_env.setdefault("JAX_PLATFORMS", "cpu")
  base_env["XLA_FLAGS"] = (base_env.get("XLA_FLAGS", "") +
                           f" --xla_force_host_platform_device_count={devices_per_process}")
  procs = []
  for i in range(num_processes):
    cmd = [sys.executable, *program, f"--coordinator_address=127.0.0.1:{port}",
           f"--num_processes={num_processes}", f"--process_id={i}", *args]
    procs.append(subprocess.Popen(cmd, env=base_env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
  results = []
  for proc in procs:
    try:
      out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      for p in procs:
        p.kill()
      raise
    results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, None))
  return results


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--num_processes", type=int, default=2)
  parser.add_argument("--devices_per_process", type=int, default=1)
  parser.add_argument("args", nargs=argparse.REMAINDER)
  ns = parser.parse_args()
  args = ns.args[1:] if ns.args[:1] == ["--"] else ns.args
  results = launch(ns.num_processes, args, ns.devices_per_process)
  for i, result in enumerate(results):
    print(f"----- process {i} (exit {result.returncode}) -----")
    print(result.stdout)
  sys.exit(max(r.returncode for r in results))


if __name__ == "__main__":
  main()
