"""A folder of images in class sub-folders (`root/<class_name>/*.png|jpg|...`) as a
random-access source. Classes are the sorted sub-folder names; images are
centre-cropped to a square and resized to `image_size` when read."""

import os

import numpy as np
from PIL import Image

from ldm_jax.errors import check

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")


def square_uint8(img: Image.Image, image_size: int, channels: int) -> np.ndarray:
  """Centre-crops a PIL image to a square, resizes it: uint8 (size, size, channels)."""
  img = img.convert("L" if channels == 1 else "RGB")
  w, h = img.size
  side = min(w, h)
  img = img.crop(((w - side) // 2, (h - side) // 2, (w + side) // 2, (h + side) // 2))
  if side != image_size:
    img = img.resize((image_size, image_size), Image.BICUBIC)
  return np.asarray(img, dtype=np.uint8).reshape(image_size, image_size, channels)


def load_image(path: str, image_size: int, channels: int) -> np.ndarray:
  """Reads one image file as uint8 (image_size, image_size, channels)."""
  with Image.open(path) as img:
    return square_uint8(img, image_size, channels)


class ImageFolderSource:
  """`len()` / `[i]` -> {"image": uint8 HWC, "label": int32}."""

  def __init__(self, root: str, image_size: int, channels: int = 3):
    check(os.path.isdir(root), f"data.folder {root!r} is not a directory")
    self.classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    check(self.classes, f"data.folder {root!r} has no class sub-folders (expected root/<class>/*.png)")
    self.items = []
    for label, name in enumerate(self.classes):
      for file in sorted(os.listdir(os.path.join(root, name))):
        if file.lower().endswith(IMAGE_EXTENSIONS):
          self.items.append((os.path.join(root, name, file), label))
    check(self.items, f"data.folder {root!r} holds no images with extensions {IMAGE_EXTENSIONS}")
    self.image_size, self.channels = image_size, channels

  def __len__(self) -> int:
    return len(self.items)

  def __getitem__(self, index: int) -> dict:
    path, label = self.items[index]
    return {"image": load_image(path, self.image_size, self.channels),
            "label": np.int32(label)}


class CaptionFolderSource:
  """Image + caption pairs: every image under `root` (recursively) with a UTF-8 `.txt`
  of the same stem next to it (`photo.jpg` + `photo.txt`). `len()` / `[i]` ->
  {"image": uint8 (size, size, channels), "caption": str}. An image without its
  caption is an error naming it (no silent empty captions)."""

  def __init__(self, root: str, image_size: int, channels: int = 3):
    check(os.path.isdir(root), f"data.folder {root!r} is not a directory (expected images "
          "with a .txt caption next to each: photo.jpg + photo.txt)")
    self.items, missing = [], []
    for directory, _, files in sorted(os.walk(root)):
      names = set(files)
      for file in sorted(files):
        stem, ext = os.path.splitext(file)
        if ext.lower() not in IMAGE_EXTENSIONS:
          continue
        caption = stem + ".txt"
        if caption in names:
          self.items.append((os.path.join(directory, file), os.path.join(directory, caption)))
        else:
          missing.append(os.path.join(directory, file))
    check(not missing, f"data.folder {root!r}: {len(missing)} image(s) have no caption file, "
          f"e.g. {missing[:3]} (each image needs STEM.txt next to it)")
    check(self.items, f"data.folder {root!r} holds no images with extensions "
          f"{IMAGE_EXTENSIONS} (and .txt captions)")
    self.image_size, self.channels = image_size, channels

  def __len__(self) -> int:
    return len(self.items)

  def caption(self, index: int) -> str:
    with open(self.items[index][1], encoding="utf-8") as f:
      return " ".join(f.read().split())

  def __getitem__(self, index: int) -> dict:
    path, _ = self.items[index]
    return {"image": load_image(path, self.image_size, self.channels),
            "caption": self.caption(index)}
