"""The FID InceptionV3 against torch-fidelity's on the same random weights, the converter,
and the missing-weights error."""

import importlib
import importlib.util
import sys
import types

import jax
import numpy as np
import pytest

from ldm_jax.convert import inception_weights
from ldm_jax.models import inception

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
  """Random weights saved as a reference .pth, and converted by our CLI."""
  root = tmp_path_factory.mktemp("inception")
  state = {k: torch.from_numpy(v) for k, v in inception.random_state(0).items()}
  state["Conv2d_1a_3x3.bn.num_batches_tracked"] = torch.tensor(0)  # dropped by the converter
  torch.save(state, root / "ref.pth")
  inception_weights.main(["--src", str(root / "ref.pth"), "--out", str(root / "fid.safetensors")])
  return root


def _torch_fidelity_extractor():
  """torch-fidelity's InceptionV3 module file, without the package's __init__ (which
  imports torchvision, which does not import beside this torch build)."""
  spec = importlib.util.find_spec("torch_fidelity")
  if spec is None:
    pytest.skip("torch-fidelity is not installed (pip install --no-deps torch-fidelity)")
  saved = {k: v for k, v in sys.modules.items() if k.split(".")[0] == "torch_fidelity"}
  package = types.ModuleType("torch_fidelity")
  package.__path__ = list(spec.submodule_search_locations)
  sys.modules["torch_fidelity"] = package
  try:
    return importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")
  finally:
    for k in [k for k in sys.modules if k.split(".")[0] == "torch_fidelity"]:
      del sys.modules[k]
    sys.modules.update(saved)


@pytest.fixture(scope="module")
def networks(weights):
  module = _torch_fidelity_extractor()
  reference = module.FeatureExtractorInceptionV3(
      "inception-v3-compat", ["2048", "logits_unbiased", "logits"],
      feature_extractor_weights_path=str(weights / "ref.pth"))
  return reference, inception.make_inception(weights / "fid.safetensors")


@pytest.mark.parametrize("size", [(64, 48), (299, 299), (320, 352)])  # up, same, down
def test_matches_torch_fidelity(networks, size):
  reference, model = networks
  images = np.random.default_rng(size[0]).integers(0, 256, (2, 3, *size), dtype=np.uint8)
  with torch.no_grad():
    expected = [t.numpy() for t in reference(torch.from_numpy(images))]
  x = images.transpose(0, 2, 3, 1).astype(np.float32) / 127.5 - 1.0  # the same 8-bit values
  got = jax.jit(lambda m, x: m(x))(model, x)
  for name, want in zip(("pool", "logits_unbiased", "logits"), expected):
    assert got[name].shape == want.shape
    scale = np.abs(want).max()
    assert scale > 1e-2, name  # random weights still give signal at the top
    np.testing.assert_allclose(np.asarray(got[name]) / scale, want / scale, atol=1e-4,
                               err_msg=name)


def test_missing_weights_say_how_to_make_them(tmp_path):
  with pytest.raises(FileNotFoundError, match="ldm_jax.convert.inception_weights"):
    inception.make_inception(tmp_path / "nope.safetensors")
  with pytest.raises(FileNotFoundError, match="No Inception weights file configured"):
    inception.make_inception("")


def test_converter_rejects_wrong_file(tmp_path, capsys):
  state = inception.random_state(0)
  del state["fc.bias"]
  state["fc.weight"] = state["fc.weight"][:1000]
  state["extra.weight"] = np.zeros(3, np.float32)
  torch.save({k: torch.from_numpy(v) for k, v in state.items()}, tmp_path / "bad.pth")
  out = tmp_path / "out.safetensors"
  with pytest.raises(SystemExit) as exit_info:
    inception_weights.main(["--src", str(tmp_path / "bad.pth"), "--out", str(out)])
  assert exit_info.value.code == 1
  err = capsys.readouterr().err
  assert "fc.bias" in err and "extra.weight" in err and "fc.weight" in err
  assert not out.exists()
  with pytest.raises(SystemExit):
    inception_weights.main(["--src", str(tmp_path / "missing.pth"), "--out", str(out)])
  assert "no weight file" in capsys.readouterr().err
