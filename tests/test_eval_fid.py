"""FID arithmetic against SciPy, streaming statistics, IS, reference files; PSNR/SSIM
against scikit-image."""

import numpy as np
import pytest
import scipy.linalg

from ldm_jax.eval import fid, metrics


def _random_stats(rng, d, n):
  x = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) / np.sqrt(d)
  return x.mean(0) + rng.normal(0, 0.3, d), np.cov(x, rowvar=False)


def _scipy_fid(mu1, s1, mu2, s2):
  covmean = scipy.linalg.sqrtm(s1 @ s2)
  return float(np.sum((mu1 - mu2)**2) + np.trace(s1) + np.trace(s2)
               - 2 * np.trace(covmean).real)


@pytest.mark.parametrize("d", [16, 64])
def test_frechet_distance_matches_scipy_sqrtm(d):
  rng = np.random.default_rng(d)
  a, b = _random_stats(rng, d, 4 * d), _random_stats(rng, d, 4 * d)
  got = fid.frechet_distance(*a, *b)
  np.testing.assert_allclose(got, _scipy_fid(*a, *b), rtol=1e-6)
  assert fid.frechet_distance(*a, *a) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_rank_deficient_is_finite_and_real():
  rng = np.random.default_rng(1)
  d = 256
  x, y = rng.standard_normal((10, d)), rng.standard_normal((12, d)) + 0.1
  mu1, s1 = x.mean(0), np.cov(x, rowvar=False)  # rank 9 of 256
  mu2, s2 = y.mean(0), np.cov(y, rowvar=False)
  value = fid.frechet_distance(mu1, s1, mu2, s2)
  assert isinstance(value, float) and np.isfinite(value) and value > 0
  # Same value as the dense definition where SciPy's root is accurate enough to compare.
  np.testing.assert_allclose(value, _scipy_fid(mu1, s1, mu2, s2), rtol=1e-4)
  # Identical rank-deficient sets: exactly comparable, ~0 rather than NaN.
  assert abs(fid.frechet_distance(mu1, s1, mu1, s1)) < 1e-6 * np.trace(s1)


def test_frechet_distance_bad_input():
  with pytest.raises(ValueError, match="one d"):
    fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
  with pytest.raises(ValueError, match="non-finite"):
    fid.frechet_distance(np.zeros(2), np.eye(2) * np.nan, np.zeros(2), np.eye(2))


def test_streaming_stats_equal_one_shot_with_masks():
  rng = np.random.default_rng(0)
  x = rng.normal(50.0, 2.0, (203, 32)).astype(np.float32)  # a large mean tests the shift
  stats = fid.FeatureStats()
  kept = []
  for start in range(0, 224, 32):  # padded last batch, a few rows masked out
    batch = np.zeros((32, 32), np.float32)
    rows = x[start:start + 32]
    batch[:len(rows)] = rows
    mask = np.arange(32) < len(rows)
    mask[3] = False
    stats.update(batch, mask)
    kept.append(batch[mask])
  kept = np.concatenate(kept).astype(np.float64)
  assert stats.count == len(kept)
  np.testing.assert_allclose(stats.mean(), kept.mean(0), rtol=1e-12)
  np.testing.assert_allclose(stats.covariance(), np.cov(kept, rowvar=False), rtol=1e-9,
                             atol=1e-12)


def test_stats_errors():
  stats = fid.FeatureStats()
  with pytest.raises(ValueError, match="at least 1"):
    stats.mean()
  stats.update(np.ones((1, 4)))
  with pytest.raises(ValueError, match="at least 2"):
    stats.covariance()
  with pytest.raises(ValueError, match="dimension 5"):
    stats.update(np.ones((2, 5)))
  with pytest.raises(ValueError, match="mask"):
    stats.update(np.ones((2, 4)), np.ones(3, bool))


def test_inception_score_matches_definition():
  rng = np.random.default_rng(0)
  logits = rng.normal(0, 3, (100, 20))
  mean, std = fid.inception_score(logits, splits=10, shuffle_seed=None)
  scores = []
  for part in np.split(logits, 10):
    p = np.exp(part) / np.exp(part).sum(1, keepdims=True)
    q = p.mean(0)
    scores.append(np.exp(np.mean(np.sum(p * np.log(p / q), axis=1))))
  np.testing.assert_allclose([mean, std], [np.mean(scores), np.std(scores)], rtol=1e-10)
  uniform = fid.inception_score(np.zeros((20, 5)), splits=10)
  np.testing.assert_allclose(uniform, (1.0, 0.0), atol=1e-12)
  with pytest.raises(ValueError, match="at least 10"):
    fid.inception_score(logits[:5])


def test_reference_stats_round_trip_in_pytorch_fid_format(tmp_path):
  rng = np.random.default_rng(0)
  mu, sigma = _random_stats(rng, 8, 20)
  path = tmp_path / "ref.npz"
  fid.save_stats(path, mu, sigma, num_examples=20)
  with np.load(path) as f:  # what pytorch-fid reads: f["mu"], f["sigma"]
    np.testing.assert_array_equal(f["mu"], mu)
    np.testing.assert_array_equal(f["sigma"], sigma)
  got = fid.load_stats(path)
  np.testing.assert_array_equal(got[0], mu)
  assert [p.name for p in tmp_path.iterdir()] == ["ref.npz"]  # no temporary left behind
  with pytest.raises(FileNotFoundError, match="reference_stats"):
    fid.load_stats(tmp_path / "missing.npz")
  np.savez(tmp_path / "bad.npz", mean=mu)
  with pytest.raises(ValueError, match="lacks"):
    fid.load_stats(tmp_path / "bad.npz")
  with pytest.raises(ValueError, match=".npz"):
    fid.save_stats(tmp_path / "ref.npy", mu, sigma)


def test_psnr_ssim_match_scikit_image():
  from skimage import data
  from skimage.metrics import peak_signal_noise_ratio, structural_similarity
  rng = np.random.default_rng(0)
  clean = data.astronaut()[::8, ::8].astype(np.float64)  # 64x64x3
  noisy = np.clip(clean + rng.normal(0, 12, clean.shape), 0, 255).round()
  x, y = (np.asarray(a, np.float32)[None] / 127.5 - 1 for a in (clean, noisy))
  np.testing.assert_allclose(float(metrics.psnr(x, y)[0]),
                             peak_signal_noise_ratio(clean, noisy, data_range=255),
                             atol=1e-4)
  expected = structural_similarity(clean, noisy, data_range=255, channel_axis=-1,
                                   gaussian_weights=True, sigma=1.5,
                                   use_sample_covariance=False)
  np.testing.assert_allclose(float(metrics.ssim(x, y)[0]), expected, atol=1e-4)
