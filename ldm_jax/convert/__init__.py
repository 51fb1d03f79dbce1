"""Weights in and out of ldm_jax: CompVis and diffusers layouts, safetensors files."""

from ldm_jax.convert.autoencoder import infer_spec, load_autoencoder, save_autoencoder

__all__ = ["load_autoencoder", "save_autoencoder", "infer_spec"]
