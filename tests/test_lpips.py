"""LPIPS: metric properties, parity with an independent PyTorch computation through the real
converter and loader, and the errors users see when weights are missing or wrong."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from ldm_jax.convert import lpips_weights
from ldm_jax.convert.torch_layout import StateMismatchError, export_state
from ldm_jax.models import lpips

torch = pytest.importorskip("torch")
F = torch.nn.functional


# One compiled forward for every model here (eager VGG dispatch compiles op by op: slow).
distance = nnx.jit(lambda model, x0, x1: model(x0, x1))


@pytest.fixture(scope="module")
def model():
  return lpips.make_lpips(None, random_init=True)


def _images(seed, shape=(2, 32, 32, 3)):
  return jax.random.uniform(jax.random.key(seed), shape, jnp.float32, -1.0, 1.0)


def test_identical_symmetric_positive(model):
  x, y = _images(0), _images(1)
  assert distance(model, x, x).shape == (2,)
  np.testing.assert_allclose(distance(model, x, x), 0.0, atol=1e-7)
  np.testing.assert_allclose(distance(model, x, y), distance(model, y, x), rtol=1e-6)
  assert np.all(np.asarray(distance(model, x, y)) > 0)


def test_normalize_has_zero_gradient_at_zero_features():
  f = jnp.zeros((1, 2, 2, 8)).at[0, 0, 0, 3].set(2.0)  # one live location, three dead
  np.testing.assert_allclose(lpips.normalize_channels(f)[0, 0, 0], f[0, 0, 0] / (2 + 1e-10))
  grad = jax.jit(jax.grad(lambda f: jnp.sum(lpips.normalize_channels(f) ** 2)))(f)
  assert np.all(np.isfinite(grad)) and np.all(grad[0, 1:] == 0)


def test_gradient_is_finite_when_a_tap_is_dead():
  """LPIPS is a loss: a dead VGG layer (all ReLUs 0) must not make the gradient NaN."""
  state = lpips.random_state(1)
  state["features.28.bias"][:] = -1e6
  dead = lpips.lpips_from_state(state, "dead relu5_3")
  x, y = _images(2), _images(3)
  grad = nnx.jit(lambda m, a, b: jax.grad(lambda a: m(a, b).sum())(a))(dead, x, y)
  assert np.all(np.isfinite(grad)) and np.any(grad != 0)


def _torch_weights(seed=0):
  """Random weights in the torchvision / LPIPS layouts, with extra keys the real files have."""
  g = torch.Generator().manual_seed(seed)
  vgg = {}
  for block in lpips.VGG_BLOCKS:
    for idx, cin, cout in block:
      std = (2.0 / (cin * 9)) ** 0.5
      vgg[f"features.{idx}.weight"] = torch.randn(cout, cin, 3, 3, generator=g) * std
      vgg[f"features.{idx}.bias"] = torch.randn(cout, generator=g) * 0.01
  vgg["classifier.6.bias"] = torch.zeros(10)  # torchvision's head; the converter drops it
  lin = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=g)
         for k, c in enumerate(lpips.TAP_CHANNELS)}
  return vgg, lin


def _torch_lpips(vgg, lin, x0, x1):
  """The LPIPS formula written directly on NCHW tensors (float64, independent of ldm_jax)."""
  shift = torch.tensor([-.030, -.088, -.188], dtype=torch.float64).view(1, 3, 1, 1)
  scale = torch.tensor([.458, .448, .450], dtype=torch.float64).view(1, 3, 1, 1)
  taps = {3, 8, 15, 22, 29}

  def features(x):
    h, out = (x - shift) / scale, []
    for i in range(30):
      if f"features.{i}.weight" in vgg:
        h = F.conv2d(h, vgg[f"features.{i}.weight"].double(), vgg[f"features.{i}.bias"].double(),
                     padding=1)
      elif i in (4, 9, 16, 23):
        h = F.max_pool2d(h, 2, 2)
      else:
        h = F.relu(h)
      if i in taps:
        out.append(h)
    return out

  total = 0
  for k, (f0, f1) in enumerate(zip(features(x0), features(x1))):
    n0 = f0 / (torch.sqrt(torch.sum(f0**2, dim=1, keepdim=True)) + 1e-10)
    n1 = f1 / (torch.sqrt(torch.sum(f1**2, dim=1, keepdim=True)) + 1e-10)
    d = F.conv2d((n0 - n1) ** 2, lin[f"lin{k}.model.1.weight"].double())
    total = total + d.mean(dim=(2, 3))
  return total[:, 0]


def test_matches_torch_through_converter(tmp_path):
  vgg, lin = _torch_weights()
  torch.save(vgg, tmp_path / "vgg16.pth")
  torch.save(lin, tmp_path / "vgg.pth")
  out = tmp_path / "lpips_vgg.safetensors"
  lpips_weights.convert(str(tmp_path / "vgg16.pth"), str(tmp_path / "vgg.pth"), str(out))
  assert set(load_file(out)) == set(lpips.torch_shapes())
  model = lpips.make_lpips(str(out))

  x, y = np.asarray(_images(4)), np.asarray(_images(5))
  got = np.asarray(distance(model, x, y))
  to_nchw = lambda a: torch.from_numpy(np.array(a)).permute(0, 3, 1, 2).double()
  want = _torch_lpips(vgg, lin, to_nchw(x), to_nchw(y)).numpy()
  assert np.all(want > 0)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

  # save_lpips writes what load_lpips reads, and what the converter wrote.
  lpips.save_lpips(model, tmp_path / "again.safetensors")
  again = load_file(tmp_path / "again.safetensors")
  for key, value in load_file(out).items():
    np.testing.assert_array_equal(again[key], value)


def test_missing_weights_file_explains_how_to_make_it(tmp_path):
  for path in (None, "", str(tmp_path / "nope.safetensors")):
    with pytest.raises(FileNotFoundError) as e:
      lpips.make_lpips(path)
    assert lpips.CONVERT_COMMAND in str(e.value)
    assert "config.loss.lpips_weights" in str(e.value)


def test_file_missing_a_key_names_it(tmp_path, model):
  tensors = {k: v for k, v in export_state(model).items() if k != "lin3.model.1.weight"}
  save_file(tensors, tmp_path / "partial.safetensors")
  with pytest.raises(StateMismatchError, match=r"lin3\.model\.1\.weight"):
    lpips.load_lpips(tmp_path / "partial.safetensors")


def test_converter_rejects_incomplete_checkpoints(tmp_path):
  vgg, lin = _torch_weights()
  del vgg["features.28.weight"]
  lin["lin1.model.1.weight"] = torch.rand(1, 64, 1, 1)
  torch.save(vgg, tmp_path / "vgg16.pth")
  torch.save(lin, tmp_path / "vgg.pth")
  out = tmp_path / "out.safetensors"
  with pytest.raises(ValueError) as e:
    lpips_weights.convert(str(tmp_path / "vgg16.pth"), str(tmp_path / "vgg.pth"), str(out))
  assert "features.28.weight: missing" in str(e.value)
  assert "lin1.model.1.weight" in str(e.value) and "(1, 128, 1, 1)" in str(e.value)
  assert not out.exists()


def test_training_dropout_is_random_and_unbiased(model):
  """The heads' dropout (loss.lpips_dropout): per key a different value, on average the
  deterministic one (inverted dropout), and no key is the deterministic value exactly."""
  x, y = _images(4), _images(5)
  plain = np.asarray(distance(model, x, y))
  np.testing.assert_array_equal(nnx.jit(lambda m, a, b: m(a, b, dropout_key=None))(
      model, x, y), plain)
  keys = jax.random.split(jax.random.key(0), 256)
  dropped = np.asarray(nnx.jit(lambda m, a, b, ks: jax.vmap(
      lambda k: m(a, b, dropout_key=k))(ks))(model, x, y, keys))  # [keys, batch]
  assert dropped.shape == (256, 2)
  assert np.all(dropped[0] != dropped[1]) and np.all(dropped != plain)
  np.testing.assert_allclose(dropped.mean(axis=0), plain, rtol=0.02)
