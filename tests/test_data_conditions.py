"""Class labels and tokenized captions travel with their images through the pipeline."""

import numpy as np
import pytest
from PIL import Image

from ldm_jax.data import builtin, pipeline
from ldm_jax.data.conditions import ConditionSpec
from ldm_jax.data.tokenizer import ByteTokenizer
from test_data import _config

TOKENIZER = ByteTokenizer(max_length=16)
BOTH = ConditionSpec(fields=("label", "tokens"), tokenizer=TOKENIZER)


def test_builtin_batches_carry_labels_and_tokens():
  it = pipeline.train_iterator(_config(image_size=32), global_batch_size=4, seed=0,
                               process_index=0, process_count=1, conditions=BOTH)
  batch = next(it)
  assert batch["image"].shape == (4, 32, 32, 3)
  assert batch["label"].shape == (4,) and batch["label"].dtype == np.int32
  assert batch["tokens"].shape == (4, 16) and batch["tokens"].dtype == np.int32
  for label, tokens in zip(batch["label"], batch["tokens"]):
    caption = builtin.CAPTIONS[builtin.PHOTOS[label]]
    np.testing.assert_array_equal(tokens, TOKENIZER([caption])[0])


def test_eval_padding_gets_blank_conditions():
  total = len(builtin.load_tiles("validation"))
  batches = list(pipeline.eval_batches(_config(image_size=32), "validation", batch_size=5,
                                       process_index=0, process_count=1, conditions=BOTH))
  labels = np.concatenate([b["label"] for b in batches])
  mask = np.concatenate([b["mask"] for b in batches])
  assert mask.sum() == total and len(labels) % 5 == 0
  assert set(labels[mask]) <= {builtin.PHOTOS.index(p) for p in builtin.VALIDATION_PHOTOS}
  np.testing.assert_array_equal(batches[-1]["tokens"][~batches[-1]["mask"]][0],
                                TOKENIZER([""])[0])


def test_eval_batches_can_carry_the_raw_captions():
  """The CLIP score tokenizes the captions its own way: evaluation batches can hold the
  text itself, stacked as a numpy string array, blank for padding."""
  spec = ConditionSpec(fields=("label", "caption"))
  batches = list(pipeline.eval_batches(_config(image_size=32), "validation", batch_size=5,
                                       process_index=0, process_count=1, conditions=spec))
  for batch in batches:
    assert batch["caption"].shape == (5,) and batch["caption"].dtype.kind == "U"
    for label, caption, real in zip(batch["label"], batch["caption"], batch["mask"]):
      assert caption == (builtin.CAPTIONS[builtin.PHOTOS[label]] if real else "")


def test_folder_labels_from_subfolders_and_sidecar_captions(tmp_path):
  rng = np.random.default_rng(0)
  for cls in ("cats", "dogs"):
    (tmp_path / cls).mkdir()
    for i in range(3):
      Image.fromarray(rng.integers(0, 255, (40, 40, 3), np.uint8)).save(
          tmp_path / cls / f"{i}.png")
  (tmp_path / "dogs" / "1.txt").write_text("a good dog\n")
  config = _config(source="folder", path=str(tmp_path), image_size=32, val_fraction=0.2)
  seen = {}
  for batch in pipeline.eval_batches(config, "train", batch_size=1, process_index=0,
                                     process_count=1, conditions=BOTH):
    seen[TOKENIZER.decode(batch["tokens"][0])] = seen.get(
        TOKENIZER.decode(batch["tokens"][0]), set()) | {int(batch["label"][0])}
  if "a good dog" in seen:  # unless that image was held out for validation
    assert seen["a good dog"] == {1}
  assert seen[""] <= {0, 1} and len(seen[""]) == 2


def test_dict_records_and_bad_specs():
  from ldm_jax.data.conditions import FieldReader
  reader = FieldReader(ConditionSpec(fields=("label", "tokens"), label_key="y",
                                     caption_key="text", tokenizer=TOKENIZER))
  out = reader({"image": b"", "y": 7, "text": b"hi"})
  assert out["label"] == 7 and TOKENIZER.decode(out["tokens"]) == "hi"
  with pytest.raises(KeyError, match="label_key"):
    FieldReader(ConditionSpec(fields=("label",)))({"image": b""})
  with pytest.raises(ValueError, match="tokenizer"):
    ConditionSpec(fields=("tokens",))
  with pytest.raises(ValueError, match="unknown condition fields"):
    ConditionSpec(fields=("class",))
