"""Fine-tunes the UNet of a Stable Diffusion 1.x / 2.x pipeline on captioned images.

  python -m ldm_jax.main --config=configs/sd_finetune.py:sd1 \
      --config.pipeline.path=PIPELINE --config.data.source=folder --config.data.path=DIR \
      --workdir=workdir/sd1_ft

`pipeline.path` (a diffusers folder or an SD single file; `pipeline.tokenizer` for a
single file, `pipeline.prediction_type=v` for an SD2-768 single file) gives the UNet's
architecture and initial weights, the VAE (the frozen first stage, with its downsampling
factor and the latent scale it states: `first_stage.downsample_factor=0` here means the
pipeline's, filled in when the run starts), the CLIP text encoder and tokenizer, and the
noise schedule; the config's `diffusion` block states the schedule too and must agree
with the pipeline's scheduler (ldm_jax.train.sd_source). When `first_stage.path` is set it replaces `pipeline.path` (it
is what `--first_stage=PATH` sets for sample / export / evaluate when the pipeline moved).

The recipe is diffusers' train_text_to_image.py (REFERENCE section 8): AdamW lr 1e-4
(weight decay 1e-2, betas 0.9 / 0.999, eps 1e-8), gradient clipping at norm 1, 500 warm-up
steps then constant, an EMA of the weights (0.9999), the VAE and text encoder frozen
(`cond.train_text_encoder=True` trains the encoder too). Our choices: caption dropout 0.1
(SD's own training dropped 10% for guidance; diffusers' script has none), batch 32, and
`optim.scale_lr=False` (True multiplies the rate by the global batch, as LDM configs do).

Variants: `sd1` (the default; SD1.x at 512 px, eps), `sd2` (SD2-base at 512 px, eps),
`sd2_v` (SD2 at 768 px, v objective), and for CPUs `demo` / `tiny`, made for a small
random pipeline of SD's topology (tests/sd_fixtures.py makes one offline, its VAE
downsampling by 2; see the README): image sizes of 64 and 16 pixels. The run exports `workdir/export/pipeline` at the end, a
diffusers folder `StableDiffusionPipeline.from_pretrained` loads.
"""

from ldm_jax.config_lib import check_variant, ldm_config
from ldm_jax.train.sd_source import DEFAULTS as PIPELINE

VARIANTS = {  # name: (image size, parameterization)
    "sd1": (512, "eps"), "sd2": (512, "eps"), "sd2_v": (768, "v"), "demo": (64, "eps"),
    "tiny": (16, "eps")}


def get_config(arg=None):
  arg = arg or "sd1"
  check_variant(arg, VARIANTS, default="sd1")
  size, parameterization = VARIANTS[arg]
  small = arg in ("demo", "tiny")
  config = ldm_config(
      # 0: the pipeline's VAE's factor, as its scale (sd_source.resolve); a number here
      # must equal it.
      first_stage=dict(kind="kl", downsample_factor=0),
      unet=dict(remat=not small),  # the architecture is the pipeline's
      # SD1 and SD2: scaled_linear betas 0.00085..0.012 over 1000 steps, CompVis's "linear".
      diffusion=dict(timesteps=1000, beta_schedule="linear", linear_start=0.00085,
                     linear_end=0.012, parameterization=parameterization),
      cond=dict(kind="clip", dropout_prob=0.1, train_text_encoder=False),
      batch_size=32, base_learning_rate=1e-4, scale_lr=False, warmup_steps=500,
      image_size=size)
  # The UNet block holds only run-time choices: anything else there is ignored, so drop it.
  config.unet = {"dtype": "float32", "remat": not small}
  config.pipeline = dict(PIPELINE)
  config.optim.update(grad_clip_norm=1.0, ema_decay=0.9999)
  config.sample.update(guidance_scale=7.5, steps=50, num=4, every=5000)
  config.train.update(num_steps=15_000, log_every=100, eval_every=5000, ckpt_every=1000)
  if not small:
    import ml_collections
    # The 860M UNet's fp32 weights, Adam moments and EMA are ~14 GiB replicated: split them
    # over each host's devices, as configs/ldm_txt2img.py does.
    config.train.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp="host", dcn_data=1))
  if arg == "demo":
    config.data.batch_size = 8
    config.optim.update(warmup_steps=20, ema_decay=0.99)
    config.sample.update(steps=20, every=100)
    config.train.update(num_steps=300, log_every=50, eval_every=100, ckpt_every=100)
  elif arg == "tiny":
    config.data.update(batch_size=2, random_crop=False, random_flip=False)
    config.optim.update(warmup_steps=0, ema_decay=0.9, base_learning_rate=1e-3)
    config.sample.update(steps=2, num=2, every=1000)
    config.train.update(num_steps=2, log_every=1, eval_every=1000, ckpt_every=1,
                        eval_at_start=False)
  return config
