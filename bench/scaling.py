"""Compile-time scaling of the real train steps: memory per device and collectives.

`python bench/scaling.py [--configs=kl_f8,ldm_txt2img] [--devices=8,32] [--meshes=data,fsdp,mixed,shipped]`

For each published config and each simulated CPU device count (a subprocess per count,
`--xla_force_host_platform_device_count`), builds the trainer's step
(`autoencoder_step.jit_train_step` / `ldm_step.jit_train_step`, under the mesh's activation
constraints) over abstract states (`jax.ShapeDtypeStruct`s with the rules' shardings: no
weight is ever allocated), compiles it without running it, and prints:

- per-device argument, output-alias and temporary bytes (`compiled.memory_analysis()`),
  and the state's per-device bytes by the rules (`mesh.describe_state`'s numbers);
- the bytes each kind of collective moves per step in the optimized HLO
  (`compiled.as_text()`: all-reduce, all-gather, reduce-scatter, all-to-all,
  collective-permute; the result shape of each op, per device), against the bytes of
  one all-reduce of the gradients (the trainable parameters, fp32).

Meshes for N devices: `data` (N x 1), `fsdp` (1 x N), `mixed` (N/8 x 8, or 2 x 4 on 8),
`shipped` (the config's own train.mesh). Batch: `--per_device_batch` images per device, by
default the config's data.batch_size / 8 (at least 1): the config's batch on one 8-device
host, the same per-device batch on 32.

Not a test: it measures. See bench/README.md for the table and what it means.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {  # name: (config file, variant)
    "kl_f8": ("configs/kl_f8.py", None),
    "vq_f4": ("configs/vq_f4.py", None),
    "sd_vae_ft_mse": ("configs/sd_vae_ft_mse.py", None),
    "ldm_cin256": ("configs/ldm_cin256.py", None),
    "ldm_txt2img": ("configs/ldm_txt2img.py", None),
    "ldm_inpaint_kl8": ("configs/ldm_inpaint_kl8.py", None),
    "sdxl_vae": ("configs/sdxl_vae.py", None),
    "sd3_vae": ("configs/sd3_vae.py", None),
    "flux_vae": ("configs/flux_vae.py", None),
}
DEFAULT_CONFIGS = ("kl_f8", "vq_f4", "sd_vae_ft_mse", "ldm_cin256", "ldm_txt2img")
# First stages of the LDM configs, by kind: the published autoencoders' architectures.
FIRST_STAGES = {"kl": "configs/kl_f8.py", "vq": "configs/vq_f4.py"}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
               "collective-permute")
_DTYPE_BYTES = {"f32": 4, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "s8": 1, "u8": 1,
                "pred": 1, "f64": 8, "s64": 8, "u64": 8, "s16": 2, "u16": 2}


def load_config(path: str, variant=None):
  spec = importlib.util.spec_from_file_location("bench_config", os.path.join(ROOT, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def config_source(name: str) -> tuple[str, str | None]:
  """`kl_f8` or `kl_f8:demo` (a variant, for quick looks) -> (file, variant)."""
  base, _, variant = name.partition(":")
  return CONFIGS[base][0], variant or CONFIGS[base][1]


def meshes_for(devices: int, names, config) -> dict:
  fsdp_mixed = 8 if devices > 8 else 4
  out = {}
  for name in names:
    if name == "data":
      out[name] = {"data": devices, "fsdp": 1}
    elif name == "fsdp":
      out[name] = {"data": 1, "fsdp": devices}
    elif name == "mixed":
      out[name] = {"data": devices // fsdp_mixed, "fsdp": fsdp_mixed}
    elif name == "shipped":
      out[name] = dict(config.train.mesh)
    else:
      raise ValueError(f"unknown mesh {name!r}")
  return out


# ---------------------------------------------------------------------------------------
# HLO


def _shape_bytes(text: str) -> tuple[int, list[str]]:
  """Bytes and shapes of an HLO result type: `f32[3,3,128]{...}` or a tuple of them."""
  total, shapes = 0, []
  for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", text):
    if dtype not in _DTYPE_BYTES:
      continue
    n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
    total += n * _DTYPE_BYTES[dtype]
    shapes.append(f"{dtype}[{dims}]")
  return total, shapes


_OP = re.compile(r"=\s*(\([^()]*\)|[a-z]+\d*\[[\d,]*\](?:\{[^}]*\})?)\s+"
                 r"(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)"
                 r"(-start)?\(")


def collectives(hlo: str) -> dict:
  """{kind: {"bytes": per-device result bytes per step, "count": n, "shapes": {...}}}.

  Async pairs are counted once, at their -start (whose result tuple also holds the
  operand: the second half is the result). Only the entry computation and the
  computations it calls are in the optimized text; no step here loops on device.
  """
  out = {k: {"bytes": 0, "count": 0, "shapes": {}} for k in COLLECTIVES}
  for line in hlo.splitlines():
    m = _OP.search(line)
    if not m:
      continue
    result, kind, start = m.groups()
    nbytes, shapes = _shape_bytes(result)
    if start and kind in ("all-gather", "collective-permute") and len(shapes) >= 2:
      half = len(shapes) // 2
      nbytes = _shape_bytes(" ".join(shapes[half:]))[0]
      shapes = shapes[half:]
    entry = out[kind]
    entry["bytes"] += nbytes
    entry["count"] += 1
    for s in shapes:
      entry["shapes"][s] = entry["shapes"].get(s, 0) + 1
  return out


_LAYOUT_CHANGES = ("all-to-all", "collective-permute")


def _stack_tables(hlo: str) -> tuple[dict, dict]:
  """The optimized HLO's source tables: {location id: "file:line function"} for files of
  this project, and {frame id: (location id, parent frame id)}."""
  sections: dict[str, list[str]] = {}
  current = None
  for line in hlo.splitlines():
    stripped = line.strip()
    if stripped in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
      current = sections.setdefault(stripped, [])
    elif current is not None and re.match(r"\d+ ", stripped):
      current.append(stripped)
    elif stripped:
      current = None
  named = lambda key: dict(re.match(r'(\d+) "(.*)"', x).groups()
                           for x in sections.get(key, []))
  files, functions = named("FileNames"), named("FunctionNames")
  locations = {}
  for x in sections.get("FileLocations", []):
    m = re.match(r"(\d+) \{file_name_id=(\d+) function_name_id=(\d+) line=(\d+)", x)
    if m and "ldm_jax/" in files.get(m.group(2), ""):
      path = "ldm_jax/" + files[m.group(2)].split("ldm_jax/", 1)[1]
      locations[m.group(1)] = f"{path}:{m.group(4)} {functions.get(m.group(3), '?')}"
  frames = {}
  for x in sections.get("StackFrames", []):
    m = re.match(r"(\d+) \{file_location_id=(\d+)(?: parent_frame_id=(\d+))?", x)
    if m:  # a reference to frame P (a parent, or an op's stack_frame_id) means entry P - 1
      parent = str(int(m.group(3)) - 1) if m.group(3) else None
      frames[m.group(1)] = (m.group(2), parent)
  return locations, frames


def layout_change_sources(hlo: str) -> dict[str, int]:
  """{"kind at file:line function < caller": ops} for the all-to-alls and
  collective-permutes: the two innermost lines of ldm_jax each op's stack frame leads to
  (the ops a missing activation constraint leaves; see bench/README.md "Layout changes")."""
  locations, frames = _stack_tables(hlo)
  out: dict[str, int] = {}
  for line in hlo.splitlines():
    m = _OP.search(line)
    if not m or m.group(2) not in _LAYOUT_CHANGES:
      continue
    frame = re.search(r"stack_frame_id=(\d+)", line)
    lines, seen = [], set()
    frame_id = str(int(frame.group(1)) - 1) if frame else None
    while frame_id in frames and frame_id not in seen and len(lines) < 2:
      seen.add(frame_id)
      location, frame_id = frames[frame_id]
      if location in locations:
        lines.append(locations[location])
    key = f"{m.group(2)} at {' < '.join(lines) or '(no source recorded)'}"
    out[key] = out.get(key, 0) + 1
  return out


# ---------------------------------------------------------------------------------------
# One configuration, in the child process


def _abstract(tree, shardings):
  import jax
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def _tree_bytes(tree) -> int:
  import jax
  import numpy as np
  return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def compile_autoencoder(config, layout, scan_micro_batches=True):
  import dataclasses

  import jax
  from flax import nnx

  from ldm_jax.models.lpips import make_lpips
  from ldm_jax.train import autoencoder_step as step_lib
  from ldm_jax import mesh as mesh_lib
  from ldm_jax.train.autoencoder_setup import abstract_state, build_programs
  from ldm_jax.data.spec import DataSpec
  lpips_def = lpips_abstract = None
  if config.loss.perceptual_weight > 0:
    lpips_def, lpips_abstract = nnx.split(nnx.eval_shape(
        lambda: make_lpips(None, random_init=True)))
  spec, programs = build_programs(config, lpips_def)
  # The step a GPU / TPU compiles (a scan over micro-batches) unless told otherwise;
  # XLA:CPU's own steps unroll them (autoencoder_step.Programs.scan_micro_batches).
  programs = dataclasses.replace(programs, scan_micro_batches=scan_micro_batches)
  state = abstract_state(config, spec, programs)
  shardings = layout.state_shardings(state)
  mesh = layout.mesh
  data = DataSpec.from_config(config.data)
  size = data.image_size
  accumulate = int(config.optim.accumulate_grad_batches)
  batch = {"image": jax.ShapeDtypeStruct(
      (accumulate, data.batch_size, size, size, 3), jax.numpy.float32,
      sharding=layout.batch_sharding(leading_dims=1))}
  lpips = (None if lpips_abstract is None else
           _abstract(lpips_abstract, jax.tree.map(lambda _: mesh_lib.replicated(mesh),
                                                  lpips_abstract)))
  step = step_lib.jit_train_step(programs, layout, shardings, lpips_abstract)
  lowered = step.lower(_abstract(state, shardings), batch, lpips)
  grads = _tree_bytes(state.params) + _tree_bytes(state.disc_params)
  return lowered, state, shardings, grads


def compile_ldm(config, layout):
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from ldm_jax.models.autoencoder import AutoencoderSpec, abstract_autoencoder
  from ldm_jax.train import ldm_step
  from ldm_jax import mesh as mesh_lib
  from ldm_jax.train.ldm_setup import abstract_state, build_programs
  from ldm_jax.data.spec import DataSpec
  first = load_config(FIRST_STAGES[config.first_stage.kind])
  fs_def, fs_abstract = nnx.split(abstract_autoencoder(AutoencoderSpec.from_config(
      first.model)))
  config.first_stage.path = config.first_stage.path or "unused"
  spec, programs = build_programs(config, fs_def)
  state = abstract_state(config, spec, programs)
  shardings = layout.state_shardings(state)
  mesh = layout.mesh
  data = DataSpec.from_config(config.data)
  b, size = data.batch_size, data.image_size
  sharding = layout.batch_sharding()
  batch = {"image": jax.ShapeDtypeStruct((b, size, size, 3), jnp.float32, sharding=sharding)}
  if config.cond.kind == "text":
    batch["tokens"] = jax.ShapeDtypeStruct((b, int(config.cond.max_length)), jnp.int32,
                                           sharding=sharding)
  elif config.cond.kind == "class":
    batch["label"] = jax.ShapeDtypeStruct((b,), jnp.int32, sharding=sharding)
  fs = _abstract(fs_abstract, jax.tree.map(lambda _: mesh_lib.replicated(mesh), fs_abstract))
  step = ldm_step.jit_train_step(programs, layout, shardings, batch, fs_abstract)
  lowered = step.lower(_abstract(state, shardings), batch, fs)
  return lowered, state, shardings, _tree_bytes(state.params)


def apply_overrides(config, overrides) -> None:
  """`--set=optim.accumulate_grad_batches=1` style overrides (values parsed as JSON)."""
  for item in overrides or ():
    key, _, value = item.partition("=")
    try:
      value = json.loads(value)
    except json.JSONDecodeError:
      pass  # a bare string
    *blocks, leaf = key.split(".")
    target = config
    for block in blocks:
      target = target[block]
    target[leaf] = value


def run_one(name: str, mesh_name: str, mesh_config: dict, per_device_batch: int | None,
            hlo_dir: str | None, overrides=(), micro_batches: str = "scan") -> dict:
  import jax

  from ldm_jax.data.spec import DataSpec
  from ldm_jax import mesh as mesh_lib
  config = load_config(*config_source(name))
  apply_overrides(config, overrides)
  if config.train.get("decoder_only") and not config.train.init_from:
    config.train.init_from = "unused"  # the state is abstract: no weights are read
  devices = jax.device_count()
  per_device = per_device_batch or max(1, DataSpec.from_config(config.data).batch_size // 8)
  config.data.batch_size = per_device * devices
  config.train.mesh = mesh_config
  layout = mesh_lib.Layout.from_config(config.train)
  mesh = layout.mesh
  start = time.perf_counter()
  is_ldm = config.get("stage") == "ldm"
  if is_ldm:
    lowered, state, shardings, grad_bytes = compile_ldm(config, layout)
  else:
    lowered, state, shardings, grad_bytes = compile_autoencoder(
        config, layout, scan_micro_batches=micro_batches == "scan")
  compiled = lowered.compile()
  seconds = time.perf_counter() - start
  memory = compiled.memory_analysis()
  hlo = compiled.as_text()
  if hlo_dir:
    os.makedirs(hlo_dir, exist_ok=True)
    with open(os.path.join(hlo_dir, f"{name}_{devices}_{mesh_name}.hlo"), "w") as f:
      f.write(hlo)
  rows = mesh_lib.state_bytes(state, shardings)
  total = sum(r["bytes"] for r in rows)
  device_state = sum(r["device_bytes"] for r in rows)
  replicated = sum(r["bytes"] for r in rows if r["device_bytes"] == r["bytes"])
  fsdp = mesh.shape["fsdp"]
  coll = collectives(hlo)
  return {
      "config": name, "devices": devices, "mesh": mesh_name, "shape": dict(mesh.shape),
      "per_device_batch": per_device, "micro_batches": micro_batches,
      "compile_s": round(seconds, 1),
      "argument_bytes": int(memory.argument_size_in_bytes),
      "output_bytes": int(memory.output_size_in_bytes),
      "alias_bytes": int(memory.alias_size_in_bytes),
      "temp_bytes": int(memory.temp_size_in_bytes),
      "state_bytes": total, "state_device_bytes": device_state,
      "state_target_bytes": (total - replicated) / fsdp + replicated,
      "replicated_bytes": replicated, "grad_bytes": grad_bytes,
      "collectives": coll, "layout_changes": layout_change_sources(hlo),
      "describe": mesh_lib.describe_state(state, shardings)}


def child(args) -> None:
  meshes = args.meshes.split(",")
  for name in args.configs.split(","):
    config = load_config(*config_source(name))
    import jax
    for mesh_name, mesh_config in meshes_for(jax.device_count(), meshes, config).items():
      try:
        row = run_one(name, mesh_name, mesh_config, args.per_device_batch, args.hlo_dir,
                      args.set, args.micro_batches)
      except Exception as e:  # a configuration that cannot be built: report, go on
        row = {"config": name, "devices": jax.device_count(), "mesh": mesh_name,
               "error": f"{type(e).__name__}: {e}"[:500]}
      print("ROW " + json.dumps(row), flush=True)


# ---------------------------------------------------------------------------------------
# The parent: a subprocess per device count, then the table


def gib(n: float) -> str:
  return f"{n / 2**30:.2f}"


def print_table(rows: list[dict]) -> None:
  print("| config | devices | mesh (data x fsdp) | batch/dev | compile s | args GiB | "
        "temp GiB | state/dev GiB | target GiB | grads GiB | all-reduce | all-gather | "
        "reduce-scatter | all-to-all | coll.-permute | AR / grads |")
  print("|" + "---|" * 16)
  for r in rows:
    if "error" in r:
      print(f"| {r['config']} | {r['devices']} | {r['mesh']} | error: {r['error']} |")
      continue
    c = r["collectives"]
    shape = f"{r['mesh']} ({r['shape']['data']} x {r['shape']['fsdp']})"
    cells = [r["config"], r["devices"], shape, r["per_device_batch"], r["compile_s"],
             gib(r["argument_bytes"]), gib(r["temp_bytes"]), gib(r["state_device_bytes"]),
             gib(r["state_target_bytes"]), gib(r["grad_bytes"])]
    cells += [gib(c[k]["bytes"]) for k in COLLECTIVES]
    cells.append(f"{c['all-reduce']['bytes'] / max(r['grad_bytes'], 1):.2f}")
    print("| " + " | ".join(str(x) for x in cells) + " |")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS))
  parser.add_argument("--devices", default="8,32")
  parser.add_argument("--meshes", default="data,fsdp,mixed")
  parser.add_argument("--per_device_batch", type=int, default=None)
  parser.add_argument("--hlo_dir", default=None, help="write each optimized HLO here")
  parser.add_argument("--set", action="append", default=[],
                      help="a config override for every config, e.g. "
                      "--set=optim.accumulate_grad_batches=1 (repeatable)")
  parser.add_argument("--micro_batches", choices=("scan", "unroll"), default="scan",
                      help="how the autoencoder step accumulates micro-batches: scan (what "
                      "GPU / TPU compile) or unroll (what XLA:CPU runs)")
  parser.add_argument("--json", default=None, help="append the rows to this JSON-lines file")
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  unknown = [c for c in args.configs.split(",") if c.split(":")[0] not in CONFIGS]
  if unknown:
    parser.error(f"unknown configs {unknown}; choose from {sorted(CONFIGS)}")
  if args.child:
    return child(args)
  rows = []
  for devices in [int(d) for d in args.devices.split(",")]:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={devices}").strip()
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    command = [sys.executable, os.path.abspath(__file__), "--child", "--configs",
               args.configs, "--meshes", args.meshes, "--micro_batches", args.micro_batches]
    if args.per_device_batch:
      command += ["--per_device_batch", str(args.per_device_batch)]
    command += [f"--set={item}" for item in args.set]
    if args.hlo_dir:
      command += ["--hlo_dir", args.hlo_dir]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    for line in proc.stdout:
      if line.startswith("ROW "):
        row = json.loads(line[4:])
        rows.append(row)
        if "error" in row:
          print(f"{row['config']} on {devices} ({row['mesh']}): {row['error']}", flush=True)
        else:
          c = row["collectives"]
          print(f"{row['config']} on {devices} ({row['mesh']} {row['shape']}): compiled in "
                f"{row['compile_s']} s; args {gib(row['argument_bytes'])} GiB, temp "
                f"{gib(row['temp_bytes'])} GiB; " + ", ".join(
                    f"{k} {gib(c[k]['bytes'])} GiB x{c[k]['count']}" for k in COLLECTIVES
                    if c[k]["count"]) + f"; grads {gib(row['grad_bytes'])} GiB", flush=True)
          for where, count in sorted(row.get("layout_changes", {}).items()):
            print(f"  {count} x {where}", flush=True)
        if args.json:
          with open(args.json, "a") as f:
            f.write(json.dumps(row) + "\n")
    if proc.wait():
      print(f"the {devices}-device run failed (exit {proc.returncode})", flush=True)
  print_table(rows)


if __name__ == "__main__":
  main()
