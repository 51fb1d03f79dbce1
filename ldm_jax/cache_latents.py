"""Encode a dataset once with an LDM config's frozen first stage.

  python -m ldm_jax.cache_latents --config=configs/ldm_txt2img.py --out=DIR

Then train with `--config.first_stage.cache_dir=DIR`. Run the same command on every host
of a pod: each writes its own shard. See ldm_jax/data/latents.py for the format.
"""

from __future__ import annotations

from absl import app, flags, logging

from ldm_jax import cli
from ldm_jax.logs import console_logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "An LDM config file.")
_OUT = flags.DEFINE_string("out", None, "Output folder (default: first_stage.cache_dir).")
_SPLITS = flags.DEFINE_list("splits", None, "Splits to encode (default: the train and "
                            "validation splits of the config).")
_MAX = flags.DEFINE_integer("max_examples", None, "Encode at most this many per split.")
_BATCH = flags.DEFINE_integer("batch_size", None, "Encoding batch (default: data.batch_size).")
_OVERWRITE = flags.DEFINE_boolean("overwrite", False, "Write into --out even when it holds "
                                  "files that are not a latent cache (same-named shards are "
                                  "replaced, nothing else is touched).")
_VERBOSE = flags.DEFINE_boolean("verbose", False, cli.VERBOSE_HELP)
flags.mark_flags_as_required(["config"])


def main(argv):
  from ldm_jax.fs import configure_storage
  configure_storage()  # gs:// (and a GCS emulator) for every storage library: see ldm_jax.fs
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  console_logging()
  config = _CONFIG.value
  out = _OUT.value or config.first_stage.cache_dir
  if not out:
    raise SystemExit("error: say where to write the cache: --out=DIR")
  from ldm_jax.data import latents
  from ldm_jax.outputs import OutputError
  try:
    latents.check_cache_dir(out, overwrite=_OVERWRITE.value)  # before anything is loaded
  except OutputError as e:
    cli.fail(e, _VERBOSE.value)
  from ldm_jax.data.sources import check_data
  from ldm_jax.data.spec import DataSpec
  from ldm_jax.train.first_stage import load_first_stage
  from ldm_jax.train import concat
  from ldm_jax.train.ldm_setup import condition_spec
  from ldm_jax.train import sd_source

  data = DataSpec.from_config(config.data)
  if config.cond.get("train_text_encoder", False):
    raise app.UsageError("cond.train_text_encoder=True: the text encoder's outputs change "
                         "as it trains, so a latent cache cannot hold them; train from "
                         "images")
  conditions = condition_spec(config)
  check_data(data, conditions=conditions)  # what the cache stores beside each latent too
  encode_fields = None
  if sd_source.is_sd(config):  # the pipeline's VAE, and its frozen text encoder's outputs
    pipe = sd_source.load(config)
    model = pipe.vae
    import jax
    from flax import nnx
    text_def, text_state = nnx.split(pipe.text_encoder)
    encode = jax.jit(lambda state, tokens: nnx.merge(text_def, state)(tokens))
    encode_fields = lambda fields: {"context": encode(text_state, fields["tokens"])}
  else:
    model = load_first_stage(config.first_stage.path)
  spec = concat.ConcatSpec.from_config(config.cond)
  if spec.kind == "inpaint":
    raise app.UsageError("cond.concat='inpaint' masks every image anew each step: train it "
                         "from images, without a latent cache")
  derived = None
  if spec.kind == "low_res":
    derived = lambda x: {"low_res": concat.downsample(x, spec.low_res_factor)}
  for split in _SPLITS.value or [data.split, data.val_split]:
    count = latents.write_cache(model, data, split, out,
                                batch_size=_BATCH.value or data.batch_size,
                                conditions=conditions, max_examples=_MAX.value,
                                derived=derived, encode_fields=encode_fields,
                                overwrite=_OVERWRITE.value)
    logging.info("cached %d examples of split %r in %s", count, split, out)


if __name__ == "__main__":
  cli.run(main, _VERBOSE)  # errors the user can fix (--config.* keys too): one line
