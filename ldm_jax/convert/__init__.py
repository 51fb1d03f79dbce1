"""Weights in and out of ldm_jax: CompVis and diffusers layouts, safetensors files."""

from ldm_jax.convert.autoencoder import infer_spec, load_autoencoder, save_autoencoder
from ldm_jax.convert.pipeline import PipelineError, load_pipeline, save_pipeline
from ldm_jax.convert.text_encoder import load_text_encoder, save_text_encoder
from ldm_jax.convert.unet import infer_unet_spec, load_unet, save_unet

__all__ = ["load_autoencoder", "save_autoencoder", "infer_spec", "load_unet", "save_unet",
           "infer_unet_spec", "load_text_encoder", "save_text_encoder", "load_pipeline",
           "save_pipeline", "PipelineError"]
