"""The Grain input pipeline: deterministic, seeded, sharded by process, with an
iterator whose state is saved in every checkpoint (exact resume mid-epoch).

Batches are dicts {"image": uint8 (B, H, W, C), "label": int32 (B,)} (text-to-image
sources: "tokens" int32 (B, L) instead of "label"); scaling to
[-1, 1] happens inside the jitted step (uint8 is 4x cheaper to move). With
`data.source = "latents"` (a cache written by `ldm_jax.data.latents.write_cache`,
`data.latent_cache = DIR`) they are {"latent": float32 (B, h, w, c), "label"} plus
"latent_std" for caches stored as mean_std; data.image_size / data.channels are then
the latent's size and channels.
"""

import grain
import jax
import numpy as np

from ldm_jax.data import builtin
from ldm_jax.errors import check

SOURCES = ("mnist", "folder", "tfds", "latents", "shapes")


class ArraySource:
  """In-memory arrays as a random-access source of {"image", "label"} records."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    self.images, self.labels = images, labels

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, index: int) -> dict:
    return {"image": self.images[index], "label": self.labels[index]}


def make_source(data_config, split: str | None = None):
  """The random-access source named by `config.data.source`.

  A latent cache holds one encoded split: `split` does not apply to it.
  """
  check(data_config.source in SOURCES,
        f"unknown data.source {data_config.source!r}; valid: {list(SOURCES)}")
  split = split or data_config.split
  if data_config.source == "mnist":
    check(data_config.image_size == 28 and data_config.channels == 1
          and data_config.num_classes == 10,
          f"built-in MNIST is 28x28x1 with 10 classes; got data.image_size="
          f"{data_config.image_size}, data.channels={data_config.channels}, "
          f"data.num_classes={data_config.num_classes}")
    return ArraySource(*builtin.load_mnist(split))
  if data_config.source == "folder":
    from ldm_jax.data.folders import ImageFolderSource
    source = ImageFolderSource(data_config.folder, data_config.image_size, data_config.channels)
    check(len(source.classes) == data_config.num_classes,
          f"data.folder {data_config.folder!r} has {len(source.classes)} class sub-folders "
          f"{source.classes[:10]}, but data.num_classes={data_config.num_classes}; set "
          f"data.num_classes={len(source.classes)}")
    return source
  if data_config.source == "shapes":
    from ldm_jax.data.shapes import CaptionedShapesSource
    from ldm_jax.data.text import tokenizer_for
    check(data_config.channels == 3 and data_config.num_classes == 0,
          f"built-in captioned shapes are RGB and text-conditioned: data.channels must be 3 "
          f"and data.num_classes 0; got {data_config.channels} and {data_config.num_classes}")
    check(data_config.get("tokenizer", "") == "shapes-words",
          f"data.source='shapes' needs data.tokenizer='shapes-words', got "
          f"{data_config.get('tokenizer', '')!r}")
    return CaptionedShapesSource(
        data_config.image_size, int(data_config.get("num_examples", 100_000)),
        seed=int(data_config.get("shapes_seed", 0)), split=split,
        two_shape_fraction=float(data_config.get("two_shape_fraction", 0.5)),
        tokenizer=tokenizer_for(data_config), return_caption=True)
  if data_config.source == "latents":
    from ldm_jax.data.latents import LatentCacheSource, check_cache
    cache_dir = data_config.get("latent_cache", "")
    check(bool(cache_dir), "data.source='latents' needs data.latent_cache=DIR, a directory "
          "written by ldm_jax.data.latents.write_cache")
    tokenizer, words = None, data_config.get("tokenizer", "")
    if words not in ("", "sd3"):
      from ldm_jax.data.text import tokenizer_for
      tokenizer = tokenizer_for(data_config)  # the cache's captions -> the model's tokens
    source = LatentCacheSource(cache_dir, tokenizer=tokenizer)
    check_cache(source.manifest, latent_channels=data_config.channels,
                latent_size=data_config.image_size, num_classes=data_config.num_classes)
    check(tokenizer is None or source.manifest.get("captions"),
          f"data.tokenizer={words!r} reads the captions of the latent cache, "
          f"but data.latent_cache={cache_dir!r} has none; encode a captioned source "
          "(e.g. data.source='shapes', or cache.source='captions')")
    return source
  from ldm_jax.data.tfds import TfdsSource
  return TfdsSource(data_config.name, split, data_config.get("data_dir") or None,
                    data_config.image_size, data_config.channels)


def make_train_iterator(data_config, global_batch_size: int, seed: int,
                        process_index: int | None = None, process_count: int | None = None):
  """An endless, reshuffled-each-epoch iterator of this process's share of the
  global batch. Supports `get_state()` / `set_state()` (and Grain's Orbax handler).

  Global batch k is records [kB, (k+1)B) of the shuffled stream; process p of P takes
  its p-th contiguous slice of B/P records, so the P per-process batches, in process
  order, are exactly the batch a single process would see (a multi-process run
  trains on the same data as a one-process run).
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  check(global_batch_size % process_count == 0,
        f"data.batch_size={global_batch_size} must be divisible by the process count "
        f"{process_count}")
  source = make_source(data_config)
  per_process = global_batch_size // process_count
  check(len(source) >= global_batch_size,
        f"data.batch_size={global_batch_size} exceeds the dataset size {len(source)}")
  dataset = (grain.MapDataset.source(source)
             .shuffle(seed=seed)
             .repeat(None)  # reshuffles every epoch
             .batch(per_process, drop_remainder=True)
             [process_index::process_count])
  workers = int(data_config.get("worker_count", 0))
  iter_dataset = dataset.to_iter_dataset()
  if workers > 0:
    iter_dataset = iter_dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  return iter(iter_dataset)
