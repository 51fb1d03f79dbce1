"""Vector quantization for VQ autoencoders (taming-transformers' VectorQuantizer2)."""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ldm_jax.models.layers import Buffer


class Quantized(NamedTuple):
  z_q: jax.Array  # straight-through quantized latent, NHWC
  loss: jax.Array  # codebook + beta * commitment (scalar)
  indices: jax.Array  # (B, H, W) code indices (remapped if a remap is set)


def _load_remap(remap: str | Sequence[int]) -> np.ndarray:
  if isinstance(remap, str):
    return np.asarray(np.load(remap), dtype=np.int32)
  return np.asarray(remap, dtype=np.int32)


class VectorQuantizer(nnx.Module):
  """Nearest-codebook quantizer with a straight-through gradient.

  `legacy=True` (the reference default) puts beta on the commitment term as
  taming-transformers did by mistake: loss = mean((sg[z_q]-z)^2) + beta*mean((z_q-sg[z])^2).
  `legacy=False` swaps the two. `remap` (a .npy path or a list of used code indices)
  renumbers indices into that subset; unknown codes become `unknown_index` ("random",
  "extra" or an int), matching the reference.
  """

  def __init__(self, n_embed: int, embed_dim: int, *, rngs: nnx.Rngs, beta: float = 0.25,
               legacy: bool = True, remap: str | Sequence[int] | None = None,
               unknown_index: str | int = "random"):
    self.n_embed, self.embed_dim, self.beta, self.legacy = n_embed, embed_dim, beta, legacy
    bound = 1.0 / n_embed
    self.embedding = nnx.Embed(
        n_embed, embed_dim, param_dtype=jnp.float32, rngs=rngs,
        embedding_init=lambda k, s, d=jnp.float32: jax.random.uniform(k, s, d, -bound, bound))
    used = None if remap is None else Buffer(jnp.asarray(_load_remap(remap)))
    self.used = used
    self.unknown_index = unknown_index
    self.re_embed = n_embed if used is None else int(used.shape[0])
    if used is not None and unknown_index == "extra":
      self.unknown_index = self.re_embed
      self.re_embed += 1

  def codebook(self) -> jax.Array:
    return self.embedding.embedding[...]

  def nearest_codes(self, z: jax.Array) -> jax.Array:
    """Index of the closest codebook vector for every position of an NHWC latent."""
    flat = z.reshape(-1, self.embed_dim).astype(jnp.float32)
    codes = self.codebook()
    dist = (jnp.sum(flat**2, axis=1, keepdims=True) + jnp.sum(codes**2, axis=1)
            - 2.0 * jnp.matmul(flat, codes.T, precision=jax.lax.Precision.HIGHEST))
    return jnp.argmin(dist, axis=1).reshape(z.shape[:-1])

  def __call__(self, z: jax.Array, key: jax.Array | None = None,
               remap: bool = True) -> Quantized:
    """Quantizes `z`. With a remap, indices are renumbered unless `remap=False` (decoding
    needs only z_q); `key` is needed for remapping with unknown_index="random"."""
    z = z.astype(jnp.float32)
    indices = self.nearest_codes(z)
    z_q = jnp.take(self.codebook(), indices, axis=0)
    sg = jax.lax.stop_gradient
    codebook_term = jnp.mean((z_q - sg(z))**2)
    commit_term = jnp.mean((sg(z_q) - z)**2)
    if self.legacy:
      loss = commit_term + self.beta * codebook_term
    else:
      loss = self.beta * commit_term + codebook_term
    z_q = z + sg(z_q - z)
    if self.used is not None and remap:
      indices = self.remap_to_used(indices, key)
    return Quantized(z_q, loss, indices)

  def remap_to_used(self, indices: jax.Array, key: jax.Array | None = None) -> jax.Array:
    used = self.used[...]
    match = indices[..., None] == used
    new = jnp.argmax(match, axis=-1).astype(indices.dtype)
    unknown = ~jnp.any(match, axis=-1)
    if self.unknown_index == "random":
      if key is None:
        raise ValueError("remap with unknown_index='random' needs a PRNG key for unknown "
                         "codes; pass key=..., or use unknown_index='extra' or an int")
      fill = jax.random.randint(key, indices.shape, 0, self.re_embed, indices.dtype)
    else:
      fill = jnp.full_like(indices, int(self.unknown_index))
    return jnp.where(unknown, fill, new)

  def unmap_to_all(self, indices: jax.Array) -> jax.Array:
    used = self.used[...]
    indices = jnp.where(indices >= used.shape[0], 0, indices)  # the "extra" token -> 0
    return jnp.take(used, indices, axis=0)

  def lookup(self, indices: jax.Array) -> jax.Array:
    """Codebook vectors for (B, H, W) indices, NHWC (indices in the remapped space if any)."""
    if self.used is not None:
      indices = self.unmap_to_all(indices)
    return jnp.take(self.codebook(), indices, axis=0)
