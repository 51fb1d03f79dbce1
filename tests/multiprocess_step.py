"""Runs a few tiny train steps on a fixed global batch, in 1 or N processes (a test helper).

Each process contributes its slice of the same global batch; process 0 writes the final
parameters to --out. Compared across process counts by tests/test_multiprocess.py.
"""

import argparse

import jax
import numpy as np


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--coordinator_address")
  parser.add_argument("--num_processes", type=int, default=1)
  parser.add_argument("--process_id", type=int, default=0)
  parser.add_argument("--out", required=True)
  args = parser.parse_args()
  if args.num_processes > 1:
    jax.distributed.initialize(args.coordinator_address, num_processes=args.num_processes,
                               process_id=args.process_id)
  from jax.experimental import multihost_utils

  from ldm_jax.config_lib import autoencoder_config
  from ldm_jax.models.autoencoder import build_autoencoder
  from ldm_jax.train import autoencoder_step as step_lib
  from ldm_jax import mesh as mesh_lib
  from ldm_jax.train.autoencoder_setup import build_programs

  config = autoencoder_config(kind="kl", embed_dim=4, z_channels=4, ch_mult=(1, 2),
                              batch_size=4, loss={}, arg="tiny")
  config.data.batch_size = 4
  spec, programs = build_programs(config)
  mesh = mesh_lib.make_mesh({"data": -1, "fsdp": 1})
  state = step_lib.new_state(build_autoencoder(spec), step_lib.build_discriminator(
      programs.loss, spec.dtype, 0), programs, False, 0)
  shardings = mesh_lib.state_shardings(mesh, state)
  state = jax.device_put(state, shardings)
  sharding = mesh_lib.batch_sharding(mesh, leading_dims=1)
  step = step_lib.jit_train_step(programs, mesh_lib.Layout(mesh), shardings)
  rng = np.random.default_rng(0)
  images = np.clip(rng.normal(0, 0.5, (3, 1, 4, 32, 32, 3)), -1, 1).astype(np.float32)
  per_process = 4 // jax.process_count()
  mine = slice(jax.process_index() * per_process, (jax.process_index() + 1) * per_process)
  for update in images:
    local = update[:, mine]
    batch = {"image": jax.make_array_from_process_local_data(sharding, local,
                                                             (1, 4, 32, 32, 3))}
    state, _ = step(state, batch, None)
  params = multihost_utils.process_allgather((state.params, state.disc_params), tiled=True)
  flat = {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(params)}
  if jax.process_index() == 0:
    np.savez(args.out, **flat)
  print("done", jax.process_index(), jax.device_count())


if __name__ == "__main__":
  main()
