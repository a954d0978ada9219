"""The captioned-shapes judge: finds the coloured shapes in an image and checks them
against a prompt of the shapes grammar (ldm_jax.data.shapes), with no learned model.

Analysis of an image (uint8 HWC RGB; float images are read as [-1, 1] when they hold
negative values, else as [0, 1]):
  1. Colour: a pixel is "ink" when its brightness V = max(R, G, B) >= INK_VALUE and
     its saturation (max - min) / max >= INK_SATURATION; its colour is the pure
     colour nearest in hue (red 0, yellow 60, green 120, blue 240 degrees) if that
     hue is within MAX_HUE_DISTANCE degrees. Bright pixels of no pure colour
     (white, grey, cyan, magenta, ...) are colour "other".
  2. Shapes: connected components (8-connected) of each colour's ink (and of the
     "other" pixels); components of fewer than MIN_AREA_FRACTION of the image's
     pixels are specks and dropped.
  3. Soft measurements: each component is grown by 2 pixels (not into another
     colour's ink) and weighted by w = clip((V / peak - FLOOR) / (1 - FLOOR), 0, 1),
     peak = the component's 95th-percentile brightness: anti-aliased or blurred
     edges count by their coverage and background noise below 15 % of the peak is
     ignored. From w: area (sum), centre (w-weighted centroid), the tallest column
     and widest row (maxima of the column / row sums of w: the bounding box's
     height and width for these convex shapes, but averaged over the shape, so
     noise barely moves them), fill = area / (tallest * widest), aspect = widest /
     tallest, and the vertical asymmetry = (centroid y - centre of the row-maxima
     profile) / height: 1/6 for an apex-up triangle, 0 for circles and squares.
  4. Kind: aspect outside [1/MAX_ASPECT, MAX_ASPECT] is "other"; |asymmetry| >=
     TRIANGLE_ASYMMETRY is a triangle; otherwise by fill (square 1, circle pi/4,
     triangle 1/2): fill < TRIANGLE_FILL is a triangle if |asymmetry| >=
     TRIANGLE_ASYMMETRY / 2 (else "other", e.g. a ring), fill >= SQUARE_FILL a
     square, else a circle.
  Measured ranges (64 px; clean -> blur sigma 1 + noise sigma 10): square fill
  0.999-1 -> 0.97-1, circle fill 0.77-0.80 -> 0.78-0.82 with |asymmetry| <= 0.01,
  triangle fill 0.52-0.59 -> 0.59-0.72 with asymmetry 0.14-0.16 -> 0.10-0.14.

Judging a prompt (`judge`):
  * count: exactly as many shapes as the prompt names;
  * colour / shape: every colour (kind) the prompt names is found, with
    multiplicity (e.g. two red shapes for "a red circle left of a red square");
  * objects: the detected (colour, kind) pairs are exactly the prompt's;
  * relation (two shapes): some assignment of the detections to the prompt's two
    shapes matches both (colour, kind) and satisfies the relation by centres with
    JUDGE_RATIO: along > 0 and along >= JUDGE_RATIO * |across| (within 45 degrees
    of the axis; captions are drawn with the stricter 1.5 and a minimum distance,
    see ldm_jax.data.shapes);
  * correct: count, objects and (for two shapes) relation all hold.
Two shapes of the same colour are two components of that colour (shapes of a
caption keep a gap of at least 3 px, 6 % of the side); if a generator merges them
into one blob, the count fails.

Measured on rendered ground truth (tests/test_shapes.py): 100 % correct at 32, 64
and 256 px, 0 % with a wrong caption (colour, kind, flipped or rotated relation,
swapped colours, count), 100 % after Gaussian blur sigma=1 + noise sigma=10 at 64 px
(also sigma=1.5 / noise 10 and sigma=1 / noise 20; 99 % at sigma=2 / noise 15).
"""

import dataclasses

import numpy as np
import scipy.ndimage

from ldm_jax.data.shapes import COLOURS, parse_caption, relation_holds
from ldm_jax.errors import check

INK_VALUE = 80
INK_SATURATION = 0.45
MAX_HUE_DISTANCE = 45.0
HUES = {"red": 0.0, "yellow": 60.0, "green": 120.0, "blue": 240.0}
MIN_AREA_FRACTION = 0.004
SQUARE_FILL = 0.88
TRIANGLE_FILL = 0.65
TRIANGLE_ASYMMETRY = 0.05
MAX_ASPECT = 1.4
JUDGE_RATIO = 1.0
FLOOR = 0.15
_NAMES = tuple(HUES)
assert set(_NAMES) == set(COLOURS)


@dataclasses.dataclass(frozen=True)
class Detection:
  """A shape found in an image: colour, kind, centre (x, y) and the measurements."""
  colour: str
  kind: str
  centre: tuple[float, float]
  area: float
  fill: float
  asymmetry: float
  aspect: float
  box: tuple[int, int, int, int]  # left, top, right, bottom (pixel indices, inclusive)

  def describe(self) -> str:
    return f"{self.colour} {self.kind} at ({self.centre[0]:.1f}, {self.centre[1]:.1f})"


def _hue_labels(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(labels int (H, W): index into _NAMES or -1, brightness V float (H, W))."""
  r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
  mx = np.maximum(np.maximum(r, g), b)
  labels = np.full(mx.shape, -1, np.int64)
  bright = mx >= INK_VALUE  # hue only where it can matter (most pixels are background)
  r, g, b, top = r[bright], g[bright], b[bright], mx[bright]
  chroma = top - np.minimum(np.minimum(r, g), b)
  safe = np.where(chroma > 0, chroma, 1.0)
  hue = np.where(top == r, ((g - b) / safe) % 6.0,
                 np.where(top == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0)) * 60.0
  targets = np.asarray([HUES[n] for n in _NAMES])
  distance = np.abs(hue[:, None] - targets)
  distance = np.minimum(distance, 360.0 - distance)
  ink = (chroma >= INK_SATURATION * top) & (distance.min(-1) <= MAX_HUE_DISTANCE)
  labels[bright] = np.where(ink, distance.argmin(-1), -1)
  return labels, mx


def _classify(fill: float, asymmetry: float, aspect: float) -> str:
  """Kind from the fill, the vertical asymmetry and the aspect ratio (see the module doc)."""
  if not 1 / MAX_ASPECT <= aspect <= MAX_ASPECT:
    return "other"
  if abs(asymmetry) >= TRIANGLE_ASYMMETRY:
    return "triangle"
  if fill < TRIANGLE_FILL:
    return "triangle" if abs(asymmetry) >= TRIANGLE_ASYMMETRY / 2 else "other"
  return "square" if fill >= SQUARE_FILL else "circle"


def analyse(image: np.ndarray, min_area_fraction: float = MIN_AREA_FRACTION
            ) -> list[Detection]:
  """The shapes of an image (uint8 (H, W, 3) RGB, or float in [0, 1] / [-1, 1]; grey
  (H, W, 1) / (H, W) images have no colour and hence no shapes), sorted by x then y."""
  image = np.asarray(image)
  check(image.ndim in (2, 3), f"shapes judge expects an HWC image; got shape {image.shape}")
  if image.ndim == 2 or image.shape[-1] == 1:
    return []
  check(image.shape[-1] in (3, 4), f"shapes judge expects RGB images; got shape {image.shape}")
  rgb = image[..., :3].astype(np.float64)
  if np.issubdtype(image.dtype, np.floating):
    # [-1, 1] (a model's output) when anything is negative, else [0, 1].
    rgb = (rgb + 1.0) * 127.5 if rgb.min() < 0 else rgb * 255.0
  labels, value = _hue_labels(rgb)
  height, width = labels.shape
  min_area = min_area_fraction * height * width
  grow = scipy.ndimage.generate_binary_structure(2, 2)
  detections = []
  for index, name in [*enumerate(_NAMES), (-1, "other")]:
    # Bright pixels of no pure colour (white, grey, cyan, ...) form "other" shapes.
    mask = labels == index if index >= 0 else (labels == -1) & (value >= INK_VALUE)
    if not mask.any():
      continue
    components, _ = scipy.ndimage.label(mask, structure=grow)
    others = (labels >= 0) & ~mask
    for k, region in enumerate(scipy.ndimage.find_objects(components), start=1):
      core = components[region] == k
      if core.sum() < min_area:
        continue
      # A window around the component, 3 px wider on each side.
      top, bottom = max(0, region[0].start - 3), min(height, region[0].stop + 3)
      left, right = max(0, region[1].start - 3), min(width, region[1].stop + 3)
      local = components[top:bottom, left:right] == k
      support = scipy.ndimage.binary_dilation(local, grow, iterations=2)
      support &= ~others[top:bottom, left:right]
      v = value[top:bottom, left:right]
      peak = max(np.percentile(v[local], 95), 1.0)
      w = np.where(support, np.clip((v / peak - FLOOR) / (1.0 - FLOOR), 0.0, 1.0), 0.0)
      area = w.sum()
      ys, xs = np.mgrid[top:bottom, left:right] + 0.5
      cx, cy = (w * xs).sum() / area, (w * ys).sum() / area
      row = w.max(1)
      box_cy = (row * (np.arange(top, bottom) + 0.5)).sum() / row.sum()
      asymmetry = (cy - box_cy) / row.sum()
      # Tallest column x widest row: the bounding box for these convex shapes, but
      # from sums (noise averages out) rather than from maxima.
      tallest, widest = w.sum(0).max(), w.sum(1).max()
      fill = area / max(tallest * widest, 1e-9)
      aspect = widest / max(tallest, 1e-9)
      detections.append(Detection(
          name, _classify(fill, asymmetry, aspect), (float(cx), float(cy)), float(area),
          float(fill), float(asymmetry), float(aspect),
          (region[1].start, region[0].start, region[1].stop - 1, region[0].stop - 1)))
  return sorted(detections, key=lambda d: d.centre)


def _multiset_contains(found: list, wanted: list) -> bool:
  pool = list(found)
  for item in wanted:
    if item not in pool:
      return False
    pool.remove(item)
  return True


def judge(image: np.ndarray, prompt: str) -> dict:
  """Checks one image against one shapes prompt.

  Returns:
    {"correct", "count", "colour", "shape", "objects": bool, "relation": bool or
     None (one-shape prompts), "detected": list of descriptions, "reasons": list of
     strings saying what is wrong (empty when correct)}.
  """
  scene = parse_caption(prompt)
  found = analyse(image)
  wanted = [(s.colour, s.kind) for s in scene.shapes]
  pairs = [(d.colour, d.kind) for d in found]
  reasons = []
  count = len(found) == len(wanted)
  if not count:
    reasons.append(f"expected {len(wanted)} shape(s), found {len(found)}")
  colour = _multiset_contains([p[0] for p in pairs], [p[0] for p in wanted])
  if not colour:
    reasons.append(f"colours {[p[0] for p in wanted]} not all found")
  shape = _multiset_contains([p[1] for p in pairs], [p[1] for p in wanted])
  if not shape:
    reasons.append(f"kinds {[p[1] for p in wanted]} not all found")
  objects = sorted(pairs) == sorted(wanted)
  if not objects and colour and shape:
    reasons.append("colours and kinds are bound to the wrong shapes")
  relation = None
  if len(wanted) == 2:
    relation = False
    matched = False
    for i, a in enumerate(found):
      for j, b in enumerate(found):
        if i != j and (a.colour, a.kind) == wanted[0] and (b.colour, b.kind) == wanted[1]:
          matched = True
          relation = relation or relation_holds(a.centre, b.centre, scene.relation,
                                                JUDGE_RATIO)
    if matched and not relation:
      reasons.append(f"relation {scene.relation!r} does not hold")
    elif not matched:
      reasons.append("relation not checked: the named shapes were not both found")
  correct = count and objects and (relation is None or relation)
  return {"correct": bool(correct), "count": bool(count), "colour": bool(colour),
          "shape": bool(shape), "objects": bool(objects),
          "relation": None if relation is None else bool(relation),
          "detected": [d.describe() for d in found], "reasons": reasons}


def score(images, prompts) -> dict:
  """Judges images against their prompts (same order).

  Returns fractions: "accuracy" (all correct), "accuracy_one" / "accuracy_two" (by
  prompt kind; NaN when none), "count", "colour", "shape", "objects" (over all),
  "relation" (over two-shape prompts), and the numbers "n", "n_one", "n_two".
  """
  prompts = list(prompts)
  check(len(images) == len(prompts),
        f"shapes score: {len(images)} images but {len(prompts)} prompts")
  check(len(prompts) > 0, "shapes score: no images to judge")
  results = [judge(image, prompt) for image, prompt in zip(images, prompts)]
  two = [r["relation"] is not None for r in results]

  def mean(key, subset=None):
    values = [r[key] for r, keep in zip(results, subset or [True] * len(results)) if keep]
    return float(np.mean(values)) if values else float("nan")

  return {"accuracy": mean("correct"),
          "accuracy_one": mean("correct", [not t for t in two]),
          "accuracy_two": mean("correct", two),
          "count": mean("count"), "colour": mean("colour"), "shape": mean("shape"),
          "objects": mean("objects"), "relation": mean("relation", two),
          "n": len(results), "n_one": len(results) - sum(two), "n_two": sum(two)}


def judge_samples(images, prompts, out_dir: str | None = None) -> dict:
  """`score` of generated samples plus the per-prompt verdicts; writes judge.json into
  `out_dir` when given. Returns the `score` dict."""
  import json  # pylint: disable=import-outside-toplevel
  import os  # pylint: disable=import-outside-toplevel
  prompts = list(prompts)
  summary = score(images, prompts)
  if out_dir is not None:
    verdicts = [dict(prompt=p, correct=bool(judge(image, p)["correct"]))
                for image, p in zip(images, prompts)]
    with open(os.path.join(out_dir, "judge.json"), "w", encoding="utf-8") as f:
      json.dump({"summary": summary, "samples": verdicts}, f, indent=2)
  return summary
