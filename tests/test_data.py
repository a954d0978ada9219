"""Data: the built-in MNIST split, the Grain pipeline (determinism, per-process
sharding, checkpointable state), image folders and TFDS data sources."""

import numpy as np
import pytest
from PIL import Image

from ldm_jax.data import builtin
from ldm_jax.data.pipeline import make_source, make_train_iterator
from ldm_jax.errors import UserError
from tests.helpers import tiny_config


def test_mnist_splits_are_fixed_and_balanced():
  train_x, train_y = builtin.load_mnist("train")
  held_x, held_y = builtin.load_mnist("heldout")
  assert train_x.shape == (4500, 28, 28, 1) and held_x.shape == (500, 28, 28, 1)
  assert train_x.dtype == np.uint8 and train_x.max() == 255
  np.testing.assert_array_equal(np.bincount(held_y), [50] * 10)
  np.testing.assert_array_equal(np.bincount(train_y), [450] * 10)
  all_x, _ = builtin.load_mnist("all")
  # Disjoint: no held-out digit appears in the training split.
  train_keys = {x.tobytes() for x in train_x}
  assert not any(x.tobytes() in train_keys for x in held_x)
  assert len(all_x) == 5000
  with pytest.raises(UserError, match="'test'.*valid"):
    builtin.load_mnist("test")


def _labels(iterator, n):
  return np.stack([next(iterator)["label"] for _ in range(n)])


def test_pipeline_is_deterministic_and_seeded():
  data = tiny_config().data
  a = _labels(make_train_iterator(data, 32, seed=1), 5)
  b = _labels(make_train_iterator(data, 32, seed=1), 5)
  c = _labels(make_train_iterator(data, 32, seed=2), 5)
  np.testing.assert_array_equal(a, b)
  assert (a != c).any()


def test_epochs_cover_every_image_and_reshuffle():
  data = tiny_config(**{"data.split": "heldout"}).data  # 500 images
  it = make_train_iterator(data, 100, seed=0)
  epoch1 = np.concatenate([next(it)["image"].reshape(100, -1) for _ in range(5)])
  epoch2 = np.concatenate([next(it)["image"].reshape(100, -1) for _ in range(5)])
  held, _ = builtin.load_mnist("heldout")
  expected = sorted(x.tobytes() for x in held.reshape(500, -1))
  assert sorted(x.tobytes() for x in epoch1) == expected
  assert sorted(x.tobytes() for x in epoch2) == expected
  assert (epoch1 != epoch2).any()  # a new order each epoch


def test_process_shards_form_the_global_batch():
  data = tiny_config().data
  whole = make_train_iterator(data, 8, seed=0, process_index=0, process_count=1)
  shards = [make_train_iterator(data, 8, seed=0, process_index=p, process_count=2)
            for p in range(2)]
  for _ in range(3):
    global_batch = next(whole)
    parts = [next(s) for s in shards]
    assert all(len(p["label"]) == 4 for p in parts)
    # Contiguous: process p holds global positions [4p, 4p + 4), in process order.
    for key in ("image", "label"):
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), global_batch[key])


def test_iterator_state_restores_mid_epoch():
  data = tiny_config().data
  it = make_train_iterator(data, 16, seed=0)
  for _ in range(7):
    next(it)
  state = it.get_state()
  expected = _labels(it, 3)
  fresh = make_train_iterator(data, 16, seed=0)
  fresh.set_state(state)
  np.testing.assert_array_equal(_labels(fresh, 3), expected)


def test_image_folder_source(tmp_path):
  rng = np.random.default_rng(0)
  for name in ("cat", "dog"):
    (tmp_path / name).mkdir()
    for i in range(3):
      Image.fromarray(rng.integers(0, 255, (40, 30, 3), np.uint8)).save(tmp_path / name / f"{i}.png")
  (tmp_path / "dog" / "notes.txt").write_text("ignored")
  config = tiny_config(**{"data.source": "folder", "data.folder": str(tmp_path),
                          "data.image_size": 16, "data.channels": 3, "data.num_classes": 2}).data
  source = make_source(config)
  assert len(source) == 6 and source.classes == ["cat", "dog"]
  record = source[4]
  assert record["image"].shape == (16, 16, 3) and record["label"] == 1
  batch = next(make_train_iterator(config, 4, seed=0))
  assert batch["image"].shape == (4, 16, 16, 3)
  with pytest.raises(UserError, match="has 2 class sub-folders.*data.num_classes=10"):
    make_source(tiny_config(**{"data.source": "folder", "data.folder": str(tmp_path)}).data)
  with pytest.raises(UserError, match="no class sub-folders"):
    make_source(tiny_config(**{"data.source": "folder", "data.folder": str(tmp_path / "cat")}).data)


def test_tfds_data_source_without_tensorflow():
  import tensorflow_datasets as tfds  # a core dependency; TensorFlow itself is not installed
  config = tiny_config(**{"data.source": "tfds", "data.name": "mnist", "data.split": "train"}).data
  with tfds.testing.mock_data(num_examples=20, policy=tfds.testing.MockPolicy.USE_CODE):
    source = make_source(config)
    assert len(source) == 20
    record = source[3]
    assert record["image"].shape == (28, 28, 1) and record["image"].dtype == np.uint8
    assert 0 <= record["label"] < 10
    batch = next(make_train_iterator(config, 8, seed=0))
    assert batch["image"].shape == (8, 28, 28, 1)


def test_mnist_needs_ten_classes():
  with pytest.raises(UserError, match="data.num_classes=5"):
    make_source(tiny_config(**{"data.num_classes": 5}).data)


def test_bad_source_names_valid_ones():
  with pytest.raises(UserError, match="'imagenet'.*valid"):
    make_source(tiny_config(**{"data.source": "imagenet"}).data)


def test_caption_folder_source(tmp_path):
  from PIL import Image
  from ldm_jax.data.folders import CaptionFolderSource
  from ldm_jax.errors import UserError
  (tmp_path / "sub").mkdir()
  for i, where in enumerate([tmp_path, tmp_path / "sub"]):
    Image.fromarray(np.full((20, 30, 3), 40 * (i + 1), np.uint8)).save(where / f"img{i}.png")
    (where / f"img{i}.txt").write_text(f"  a photo\nnumber {i} \n", encoding="utf-8")
  source = CaptionFolderSource(str(tmp_path), 16)
  assert len(source) == 2
  record = source[1]
  assert record["image"].shape == (16, 16, 3) and record["caption"] == "a photo number 1"
  assert int(record["image"][0, 0, 0]) == 80
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "orphan.png")
  with pytest.raises(UserError, match="1 image\\(s\\) have no caption file.*orphan.png"):
    CaptionFolderSource(str(tmp_path), 16)
  with pytest.raises(UserError, match="is not a directory"):
    CaptionFolderSource(str(tmp_path / "absent"), 16)
