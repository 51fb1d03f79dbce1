"""Fréchet distance, streaming feature statistics and the Inception Score, on the host.

Means and covariances are accumulated in float64 with NumPy: a covariance of 2048-d
features over tens of thousands of images loses digits in float32, and FID takes the
difference of large traces. The sums are taken around a shift (the first batch's mean), so
`sum(x xᵀ) - n mu muᵀ` does not cancel catastrophically when features have a large mean.

Reference statistics are `.npz` files holding `mu` (d,) and `sigma` (d, d), the format
pytorch-fid writes, so files move between the two.
"""

from __future__ import annotations

import os

import numpy as np

from ldm_jax import fs, outputs


class FeatureStats:
  """Running mean and covariance of feature vectors, fed batch by batch."""

  def __init__(self, dim: int | None = None):
    self.dim = dim
    self.count = 0
    self._shift = None
    self._sum = None
    self._outer = None

  def update(self, features, mask=None) -> None:
    """Adds the rows of `features` [n, d] (those where `mask` is True, if given)."""
    x = np.asarray(features, np.float64)
    if x.ndim != 2:
      raise ValueError(f"features must be [n, d], got shape {x.shape}")
    if mask is not None:
      mask = np.asarray(mask, bool).reshape(-1)
      if mask.shape[0] != x.shape[0]:
        raise ValueError(f"mask has {mask.shape[0]} entries for {x.shape[0]} feature rows")
      x = x[mask]
    if self.dim is None:
      self.dim = x.shape[1]
    if x.shape[1] != self.dim:
      raise ValueError(f"features of dimension {x.shape[1]}, expected {self.dim}")
    if not x.shape[0]:
      return
    if self._shift is None:
      self._shift = x.mean(axis=0)
      self._sum = np.zeros(self.dim)
      self._outer = np.zeros((self.dim, self.dim))
    x = x - self._shift
    self.count += x.shape[0]
    self._sum += x.sum(axis=0)
    self._outer += x.T @ x

  def mean(self) -> np.ndarray:
    self._need(1)
    return self._shift + self._sum / self.count

  def covariance(self) -> np.ndarray:
    """Unbiased (n - 1) covariance, as `np.cov(features, rowvar=False)`."""
    self._need(2)
    m = self._sum / self.count
    cov = (self._outer - self.count * np.outer(m, m)) / (self.count - 1)
    return (cov + cov.T) / 2

  def _need(self, n: int) -> None:
    if self.count < n:
      raise ValueError(f"feature statistics need at least {n} samples, got {self.count}")


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """||mu1 - mu2||² + tr(S1) + tr(S2) - 2 tr((S1 S2)^½), in float64.

  tr((S1 S2)^½) = tr((A S2 A)^½) with A = S1^½, and A S2 A is symmetric PSD: its square
  root's trace is the sum of the roots of its eigenvalues, clipped at 0. Real arithmetic
  throughout, so no complex parts, and no NaN when a covariance is rank-deficient (fewer
  images than feature dimensions).
  """
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  d = mu1.shape[0]
  if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
    raise ValueError(f"Fréchet distance needs means (d,) and covariances (d, d) of one d, got "
                     f"{mu1.shape}, {sigma1.shape}, {mu2.shape}, {sigma2.shape}")
  for name, a in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
    if not np.all(np.isfinite(a)):
      raise ValueError(f"{name} has non-finite values")
  root1 = psd_sqrt(sigma1)
  inner = root1 @ sigma2 @ root1
  eig = np.linalg.eigvalsh((inner + inner.T) / 2)
  trace_sqrt = np.sum(np.sqrt(np.clip(eig, 0.0, None)))
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


def psd_sqrt(sigma: np.ndarray) -> np.ndarray:
  """The symmetric square root of a symmetric PSD matrix (negative round-off clipped)."""
  eig, vec = np.linalg.eigh((sigma + sigma.T) / 2)
  return (vec * np.sqrt(np.clip(eig, 0.0, None))) @ vec.T


def inception_score(logits, splits: int = 10, shuffle_seed: int | None = 2020
                    ) -> tuple[float, float]:
  """Mean and std over `splits` of exp(E_x KL(p(y|x) || p(y))), p = softmax(logits).

  torch-fidelity's convention: float64, rows shuffled with NumPy's RandomState(2020) before
  splitting (None keeps the order), split i = rows [i n / s, (i + 1) n / s).
  """
  logits = np.asarray(logits, np.float64)
  if logits.ndim != 2:
    raise ValueError(f"logits must be [n, classes], got shape {logits.shape}")
  n = logits.shape[0]
  if n < splits:
    raise ValueError(f"the Inception Score over {splits} splits needs at least {splits} "
                     f"images, got {n}")
  if shuffle_seed is not None:
    logits = logits[np.random.RandomState(shuffle_seed).permutation(n)]
  log_p = logits - logits.max(axis=1, keepdims=True)
  log_p = log_p - np.log(np.exp(log_p).sum(axis=1, keepdims=True))
  p = np.exp(log_p)
  scores = []
  for i in range(splits):
    rows = slice(i * n // splits, (i + 1) * n // splits)
    log_q = np.log(p[rows].mean(axis=0, keepdims=True))
    kl = np.sum(p[rows] * (log_p[rows] - log_q), axis=1)
    scores.append(np.exp(kl.mean()))
  return float(np.mean(scores)), float(np.std(scores))


def save_stats(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray, *,
               overwrite: bool = False, **extra) -> None:
  """Writes `mu` and `sigma` (pytorch-fid's keys) atomically; `extra` arrays ride along.
  A file at `path` that ldm_jax did not write as statistics is kept unless `overwrite`."""
  mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
  if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
    raise ValueError(f"mu must be (d,) and sigma (d, d), got {mu.shape} and {sigma.shape}")
  path = os.fspath(path)
  if not path.endswith(".npz"):
    raise ValueError(f"reference statistics are .npz files, got {path!r}")
  outputs.write_npz(path, {"mu": mu, "sigma": sigma, **extra}, outputs.REFERENCE_STATS,
                    overwrite=overwrite)


def load_stats(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
  """`mu` and `sigma` of an .npz written by `save_stats` or by pytorch-fid."""
  path = os.fspath(path)
  if not fs.exists(path):
    raise FileNotFoundError(
        f"no reference statistics at {path!r}; compute them once with `python -m "
        "ldm_jax.eval.reference_stats --config=CONFIG --out=FILE.npz`")
  with fs.open(path, "rb") as handle, np.load(handle) as f:  # local or gs://
    missing = {"mu", "sigma"} - set(f.files)
    if missing:
      raise ValueError(f"{path} lacks {sorted(missing)}; expected an .npz with mu and sigma "
                       "as pytorch-fid or ldm_jax.eval.reference_stats write")
    mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
  if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
    raise ValueError(f"{path}: mu {mu.shape} and sigma {sigma.shape} do not fit together")
  return mu, sigma


def fid_from_stats(stats: FeatureStats, reference: FeatureStats | tuple) -> float:
  """FID of accumulated features against other features or a (mu, sigma) pair."""
  if isinstance(reference, FeatureStats):
    reference = (reference.mean(), reference.covariance())
  return frechet_distance(stats.mean(), stats.covariance(), *reference)
