"""Tiny Stable Diffusion pipelines built with diffusers and transformers, for tests.

Nothing is downloaded: every component is made from a local config with random weights,
and the CLIP tokenizer's vocab.json / merges.txt are written here. The shapes follow SD's
wiring at toy sizes: UNet widths (32, 64) with cross-attention at the first level only,
VAE widths (32, 64) (downsampling x2) with 4 latent channels, a 2-layer CLIP text tower of
width 32 whose width is the UNet's context_dim.

`build_diffusers_pipeline(tmp_path)` returns `(pipe, folder)`: the diffusers
`StableDiffusionPipeline` and the folder `save_pretrained` wrote it to. Weights are
perturbed away from their initial values (norm gains, biases) so that parity checks
cannot pass on a wrongly-mapped zero or one.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np

START, END = "<|startoftext|>", "<|endoftext|>"
# Words the tiny vocabulary knows whole; anything else falls apart into byte tokens.
WORDS = ("a", "photo", "of", "cat", "dog", "astronaut", "riding", "horse", "red", "painting",
         "the", "on", "moon", "high", "quality")
PROMPTS = ("a photo of a cat", "an astronaut riding a horse on the moon")
SAMPLE_SIZE = 8  # latent size; images are 2x that (the tiny VAE downsamples once)
CONTEXT_DIM = 32
SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                beta_schedule="scaled_linear")


def _byte_chars() -> list[str]:
  """CLIP's printable stand-ins for the 256 bytes, in its vocabulary order."""
  kept = [*range(33, 127), *range(161, 173), *range(174, 256)]
  return [chr(b) for b in kept] + [chr(256 + n) for n in range(256 - len(kept))]


def write_tokenizer(folder, *, sd2: bool = False, words=WORDS) -> str:
  """A CLIP tokenizer folder as diffusers pipelines hold it.

  The merges join each word left to right, one character at a time, so every word of
  `words` is one token; SD1 pads with <|endoftext|>, SD2 with "!" (id 0), as their
  released tokenizer folders say in special_tokens_map.json.
  """
  os.makedirs(folder, exist_ok=True)
  chars = _byte_chars()
  merges, seen = [], set()
  for word in words:  # ASCII words: their byte characters are the letters themselves
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    left = parts[0]
    for right in parts[1:]:
      if (left, right) not in seen:
        seen.add((left, right))
        merges.append((left, right))
      left = left + right
  tokens = chars + [c + "</w>" for c in chars]
  for a, b in merges:
    if a + b not in tokens:
      tokens.append(a + b)
  tokens += [START, END]
  with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
    json.dump({t: i for i, t in enumerate(tokens)}, f, ensure_ascii=False)
  with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
  special = {"bos_token": START, "eos_token": END, "unk_token": END,
             "pad_token": "!" if sd2 else END}
  with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
    json.dump(special, f)
  with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
    json.dump({**special, "model_max_length": 77, "do_lower_case": True,
               "tokenizer_class": "CLIPTokenizer", "add_prefix_space": False}, f)
  return str(folder)


def vocab_size(folder) -> int:
  with open(os.path.join(folder, "vocab.json"), encoding="utf-8") as f:
    return max(json.load(f).values()) + 1


def perturb(module, seed: int = 0, scale: float = 0.1):
  """Moves every 1-D parameter (norm gains and biases, which init at 1 and 0) by noise."""
  import torch
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      if p.ndim == 1:
        p.add_(scale * torch.randn(p.shape, generator=generator))
  return module.eval()


def tiny_unet(*, sd2: bool = False, inpaint: bool = False, seed: int = 0):
  """SD1: 8 heads at every level, conv proj_in/out. SD2: a fixed head width (16; SD2's is
  64) written as diffusers does, heads per level in attention_head_dim, linear proj."""
  import torch
  from diffusers import UNet2DConditionModel
  torch.manual_seed(seed)
  unet = UNet2DConditionModel(
      sample_size=SAMPLE_SIZE, in_channels=9 if inpaint else 4, out_channels=4,
      block_out_channels=(32, 64), layers_per_block=1,
      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
      cross_attention_dim=CONTEXT_DIM, attention_head_dim=[2, 4] if sd2 else 8,
      use_linear_projection=sd2, norm_num_groups=32)
  return perturb(unet, seed)


def tiny_vae(seed: int = 1):
  import torch
  from diffusers import AutoencoderKL
  torch.manual_seed(seed)
  vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                      block_out_channels=(32, 64), layers_per_block=1,
                      down_block_types=("DownEncoderBlock2D",) * 2,
                      up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=32,
                      sample_size=2 * SAMPLE_SIZE, scaling_factor=0.18215)
  return perturb(vae, seed)


def tiny_text_encoder(vocab: int, *, sd2: bool = False, seed: int = 2):
  """SD1: quick GELU (openai CLIP). SD2: exact GELU (OpenCLIP), stored as diffusers stores
  SD2's: already cut to the layers SD reads, so last_hidden_state is the context."""
  import torch
  from transformers import CLIPTextConfig, CLIPTextModel
  torch.manual_seed(seed)
  config = CLIPTextConfig(vocab_size=vocab, hidden_size=CONTEXT_DIM, intermediate_size=64,
                          num_hidden_layers=2, num_attention_heads=4,
                          max_position_embeddings=77,
                          hidden_act="gelu" if sd2 else "quick_gelu",
                          bos_token_id=0, pad_token_id=1, eos_token_id=2)
  return perturb(CLIPTextModel(config), seed)


def tiny_scheduler(*, v_prediction: bool = False, kind: str = "ddim"):
  """SD's training betas; DDIM with SD1's released settings, or PNDM (SD1's default)."""
  from diffusers import DDIMScheduler, PNDMScheduler
  prediction = "v_prediction" if v_prediction else "epsilon"
  if kind == "pndm":
    return PNDMScheduler(**SD_BETAS, skip_prk_steps=True, set_alpha_to_one=False,
                         steps_offset=1, prediction_type=prediction)
  return DDIMScheduler(**SD_BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                       prediction_type=prediction, timestep_spacing="leading")


def build_diffusers_pipeline(tmp_path, *, v_prediction: bool = False, sd2: bool = False,
                             inpaint: bool = False, scheduler: str = "ddim", name: str = "",
                             hub_tokenizer_files: bool = True):
  """(diffusers StableDiffusionPipeline in eval mode, the folder it was saved to).

  transformers 5 saves a tokenizer as tokenizer.json + tokenizer_config.json only; the
  released SD folders also hold vocab.json, merges.txt and special_tokens_map.json, which
  `hub_tokenizer_files` copies in (False: the folder as transformers 5 leaves it).

  `inpaint` gives the UNet 9 input channels (latent, mask, masked-image latent) and saves
  a StableDiffusionInpaintPipeline. The folder is `tmp_path / name` (default from the
  options), so one test can build several.
  """
  from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline
  from transformers import CLIPTokenizer
  name = name or "sd" + ("2" if sd2 else "1") + ("-v" if v_prediction else "") + (
      "-inpaint" if inpaint else "")
  folder = os.path.join(str(tmp_path), name)
  words = write_tokenizer(os.path.join(str(tmp_path), name + "-tokenizer-src"), sd2=sd2)
  tokenizer = CLIPTokenizer.from_pretrained(words)
  klass = StableDiffusionInpaintPipeline if inpaint else StableDiffusionPipeline
  pipe = klass(unet=tiny_unet(sd2=sd2, inpaint=inpaint), vae=tiny_vae(),
               text_encoder=tiny_text_encoder(vocab_size(words), sd2=sd2),
               tokenizer=tokenizer, scheduler=tiny_scheduler(v_prediction=v_prediction,
                                                             kind=scheduler),
               safety_checker=None, feature_extractor=None, requires_safety_checker=False)
  pipe.save_pretrained(folder)
  if hub_tokenizer_files:
    for file in ("vocab.json", "merges.txt", "special_tokens_map.json"):
      shutil.copy(os.path.join(words, file), os.path.join(folder, "tokenizer", file))
  pipe.set_progress_bar_config(disable=True)
  return pipe, folder


def unet_inputs(inpaint: bool = False, batch: int = 2, seed: int = 0):
  """(latent NCHW float32, timesteps int64, context [B, 77, CONTEXT_DIM]) as NumPy."""
  rng = np.random.default_rng(seed)
  latent = rng.standard_normal((batch, 9 if inpaint else 4, SAMPLE_SIZE, SAMPLE_SIZE))
  context = rng.standard_normal((batch, 77, CONTEXT_DIM))
  return (latent.astype(np.float32), np.array([10, 700][:batch] + [500] * (batch - 2)),
          context.astype(np.float32))
