"""TFDS datasets through `tfds.data_source` (array_record, random access) with no
TensorFlow installed. The dataset must already be prepared in `data_dir`."""

import numpy as np

from ldm_jax.data.folders import Image, square_uint8
from ldm_jax.errors import UserError


class TfdsSource:
  """Wraps a TFDS data source into {"image": uint8 HWC resized, "label": int32}."""

  def __init__(self, name: str, split: str, data_dir: str | None, image_size: int,
               channels: int, image_key: str = "image", label_key: str = "label"):
    import tensorflow_datasets as tfds  # heavy import, only when asked for
    try:
      self.source = tfds.data_source(name, split=split, data_dir=data_dir)
    except Exception as e:  # tfds raises many types for a missing / unprepared dataset
      raise UserError(f"cannot open TFDS dataset {name!r} split {split!r} in data_dir "
                      f"{data_dir!r}: {e}") from e
    self.image_key, self.label_key = image_key, label_key
    self.image_size, self.channels = image_size, channels

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict:
    record = self.source[index]
    image = np.asarray(record[self.image_key])
    if image.shape != (self.image_size, self.image_size, self.channels):
      image = square_uint8(Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image),
                           self.image_size, self.channels)
    return {"image": image.astype(np.uint8), "label": np.int32(record[self.label_key])}
