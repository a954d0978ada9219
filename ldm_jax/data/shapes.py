"""Captioned shapes: a built-in procedural text-to-image dataset (nothing to download).

Each image (any square `size`, black background) holds one or two FILLED shapes
from {circle, square, triangle} in one of four pure colours {red (255,0,0), green
(0,255,0), blue (0,0,255), yellow (255,255,0)}, captioned by the grammar

  caption  := "a" COLOUR KIND [RELATION "a" COLOUR KIND]
  RELATION := "left of" | "right of" | "above" | "below"

e.g. "a red circle" or "a red circle left of a blue square" (the first shape is
the subject: it is left of the second).

Geometry (coordinates: x to the right, y downwards, in pixels; pixel (row i,
column j) covers [j, j+1] x [i, i+1]):
  * every shape has an axis-aligned bounding box of side `extent`, drawn uniformly
    from SIZE_RANGE (20-40 %) of the image side; a circle fills its box's
    inscribed disc, a square its box, a triangle is isosceles with its base on the
    box's bottom edge and its apex at the top middle (apex up). A shape's `centre`
    is its area centroid (for a triangle 2/3 of the way down from the apex).
  * boxes lie fully inside the image with a margin of max(1 px, 2 % of the side);
  * two shapes never overlap: their boxes are disjoint with a gap of at least
    max(3 px, 6 % of the side) along x or y (so their pixels never touch, even
    after a mild blur);
  * the relation holds clearly by centres: with `along` the offset of the second
    centre from the first along the relation's axis (x for left/right, y for
    above/below; positive when the caption is true) and `across` the offset
    along the other axis, every caption satisfies along >= CAPTION_RATIO * |across|
    (the offset lies within ~34 degrees of the axis) and along >= 15 % of the side.
  * the two shapes of a caption differ in colour or kind (never both), so each
    shape of a caption names exactly one shape of the image; same colour with
    different kinds, or same kind with different colours, do occur.

Rendering is anti-aliased: each pixel's coverage is the fraction of 4 x 4 sub-pixel
samples inside the shape, and the pixel is coverage x colour (shapes never touch,
so there is no blending between shapes). The pure colours make segmentation by
hue trivial; see ldm_jax.evaluation.shapes_judge.

Held-out prompts (never seen verbatim in training):
  * one shape: ONE_SHAPE_HELDOUT = red triangle, green square, blue circle (3 of
    the 12 colour-kind pairs; each colour-kind pair still appears inside
    two-shape training captions, so a model can learn to compose them);
  * two shapes: the 528 captions form 264 scenes ("A left of B" is the same scene
    as "B right of A"; "A above B" as "B below A"); the 26 scenes (~10 %) whose
    canonical caption (the left of / above form) has the smallest SHA-256 digest
    are held out with both their captions (52 captions).
The "train" split never yields a held-out caption, "heldout" only held-out ones,
"all" any caption.

Determinism: example `index` of (`seed`, `split`) comes from
numpy.random.default_rng([seed, split id, index]), so it is random-access and
always the same image and caption (for a given numpy version's generator streams).

Batching: grain batches the "caption" strings into a numpy unicode array; with a
tokenizer (ldm_jax.data.word_tokenizer.WordTokenizer) the source also returns
"tokens" int32 (max_length,) (padding id 0, so the mask is tokens != 0) and, by
default, drops the caption so that every leaf of a batch is numeric.
"""

import dataclasses
import functools
import hashlib
import os

import numpy as np

from ldm_jax.errors import UserError, check

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255),
           "yellow": (255, 255, 0)}
KINDS = ("circle", "square", "triangle")
RELATIONS = ("left of", "right of", "above", "below")
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
SPLITS = ("train", "heldout", "all")
_SPLIT_IDS = {"train": 0, "heldout": 1, "all": 2}

SIZE_RANGE = (0.20, 0.40)      # box side as a fraction of the image side
MARGIN = (1.0, 0.02)           # (pixels, fraction of the side): the larger is used
GAP = (3.0, 0.06)              # minimum gap between the two boxes
CAPTION_RATIO = 1.5            # along >= CAPTION_RATIO * |across|
MIN_ALONG = 0.15               # along >= MIN_ALONG * side
SUPERSAMPLE = 4
ONE_SHAPE_HELDOUT = (("red", "triangle"), ("green", "square"), ("blue", "circle"))
TWO_SHAPE_HELDOUT_FRACTION = 0.10

GRAMMAR = ('"a COLOUR KIND" or "a COLOUR KIND RELATION a COLOUR KIND" with COLOUR in '
           f"{list(COLOURS)}, KIND in {list(KINDS)}, RELATION in {list(RELATIONS)}")
_PUNCTUATION = ".,;:!?"


@dataclasses.dataclass(frozen=True)
class Shape:
  """One shape: colour name, kind, centre (x, y) = area centroid, box side (pixels).

  `centre` and `extent` are None for a shape parsed from a caption.
  """
  colour: str
  kind: str
  centre: tuple[float, float] | None = None
  extent: float | None = None

  @property
  def box(self) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of the shape's bounding box."""
    x, y = self.centre
    half = self.extent / 2
    top = y - 2 * self.extent / 3 if self.kind == "triangle" else y - half
    return (x - half, top, x + half, top + self.extent)


@dataclasses.dataclass(frozen=True)
class Scene:
  """One or two shapes; `relation` (two shapes only) says shapes[0] RELATION shapes[1]."""
  shapes: tuple[Shape, ...]
  relation: str | None = None

  @property
  def caption(self) -> str:
    words = [f"a {s.colour} {s.kind}" for s in self.shapes]
    return words[0] if len(words) == 1 else f"{words[0]} {self.relation} {words[1]}"


# ----------------------------------------------------------------------------- captions


def normalise_words(text: str) -> list[str]:
  """Lower-cases, splits on whitespace, strips punctuation .,;:!? from each word."""
  words = (w.strip(_PUNCTUATION) for w in str(text).lower().split())
  return [w for w in words if w]


def parse_caption(caption: str) -> Scene:
  """The scene a caption describes (no geometry); UserError if it is not in the grammar."""
  words = normalise_words(caption)

  def fail():
    raise UserError(f"cannot parse the shapes caption {caption!r}; the grammar is {GRAMMAR}")

  def shape_at(i):
    if len(words) < i + 3 or words[i] != "a" or words[i + 1] not in COLOURS \
        or words[i + 2] not in KINDS:
      fail()
    return Shape(words[i + 1], words[i + 2])

  first = shape_at(0)
  if len(words) == 3:
    return Scene((first,))
  rest = words[3:]
  if rest[:2] in (["left", "of"], ["right", "of"]):
    relation, start = " ".join(rest[:2]), 5
  elif rest[:1] in (["above"], ["below"]):
    relation, start = rest[0], 4
  else:
    fail()
  if len(words) != start + 3:
    fail()
  return Scene((first, shape_at(start)), relation)


def _canonical(scene: Scene) -> str:
  """The scene's caption in its left-of / above form (identical for mirrored captions)."""
  if scene.relation in ("right of", "below"):
    scene = Scene(scene.shapes[::-1], INVERSE[scene.relation])
  return scene.caption


def all_prompts(kind: str = "two") -> list[str]:
  """Every caption of one kind ("one" or "two" shapes) the grammar's dataset uses."""
  check(kind in ("one", "two"), f"unknown prompt kind {kind!r}; valid: ['one', 'two']")
  pairs = [(c, k) for c in COLOURS for k in KINDS]
  if kind == "one":
    return [f"a {c} {k}" for c, k in pairs]
  return [f"a {c1} {k1} {r} a {c2} {k2}" for (c1, k1) in pairs for r in RELATIONS
          for (c2, k2) in pairs if (c1, k1) != (c2, k2)]


def _digest(text: str) -> str:
  return hashlib.sha256(text.encode()).hexdigest()


@functools.lru_cache(maxsize=1)
def _heldout_sets() -> tuple[frozenset, frozenset]:
  one = frozenset(f"a {c} {k}" for c, k in ONE_SHAPE_HELDOUT)
  scenes = sorted({_canonical(parse_caption(p)) for p in all_prompts("two")}, key=_digest)
  held = set(scenes[:round(TWO_SHAPE_HELDOUT_FRACTION * len(scenes))])
  two = frozenset(p for p in all_prompts("two") if _canonical(parse_caption(p)) in held)
  return one, two


def heldout_prompts(kind: str = "two") -> list[str]:
  """The held-out captions of one kind ("one" or "two" shapes), in grammar order."""
  held = _heldout_sets()[0 if kind == "one" else 1]
  return [p for p in all_prompts(kind) if p in held]


def training_prompts(kind: str = "two") -> list[str]:
  """The captions of one kind the "train" split uses (all minus the held-out ones)."""
  held = _heldout_sets()[0 if kind == "one" else 1]
  return [p for p in all_prompts(kind) if p not in held]


def is_heldout(caption: str) -> bool:
  """Whether a caption (any spelling the parser accepts) is a held-out prompt."""
  scene = parse_caption(caption)
  one, two = _heldout_sets()
  return scene.caption in (one if len(scene.shapes) == 1 else two)


def _prompts_for_split(split: str, kind: str) -> list[str]:
  check(split in SPLITS, f"unknown shapes split {split!r}; valid: {list(SPLITS)}")
  if split == "train":
    return training_prompts(kind)
  return heldout_prompts(kind) if split == "heldout" else all_prompts(kind)


# ----------------------------------------------------------------------------- geometry


def _px(spec: tuple[float, float], size: int) -> float:
  return max(spec[0], spec[1] * size)


def relation_offsets(first: tuple[float, float], second: tuple[float, float],
                     relation: str) -> tuple[float, float]:
  """(along, across): the offset of `second`'s centre from `first`'s along the
  relation's axis (positive when "first RELATION second" holds) and across it."""
  dx, dy = second[0] - first[0], second[1] - first[1]
  along, across = {"left of": (dx, dy), "right of": (-dx, dy),
                   "above": (dy, dx), "below": (-dy, dx)}[relation]
  return along, abs(across)


def relation_holds(first, second, relation: str, ratio: float = CAPTION_RATIO,
                   min_along: float = 0.0) -> bool:
  """Whether "first RELATION second" holds for centres (x, y): along >= ratio *
  |across| and along >= min_along (and along > 0)."""
  along, across = relation_offsets(first, second, relation)
  return along > 0 and along >= ratio * across and along >= min_along


def boxes_separated(a: Shape, b: Shape, gap: float) -> bool:
  """Whether two shapes' boxes are disjoint with at least `gap` between them (x or y)."""
  la, ta, ra, ba = a.box
  lb, tb, rb, bb = b.box
  return lb - ra >= gap or la - rb >= gap or tb - ba >= gap or ta - bb >= gap


def _place(rng: np.random.Generator, colour: str, kind: str, extent: float,
           size: int) -> Shape:
  margin = _px(MARGIN, size)
  left = rng.uniform(margin, size - margin - extent)
  top = rng.uniform(margin, size - margin - extent)
  y = top + (2 * extent / 3 if kind == "triangle" else extent / 2)
  return Shape(colour, kind, (float(left + extent / 2), float(y)), float(extent))


def scene_is_valid(scene: Scene, size: int) -> bool:
  """Whether a scene obeys the dataset's geometry rules (see the module docstring)."""
  margin = _px(MARGIN, size)
  for s in scene.shapes:
    left, top, right, bottom = s.box
    if left < margin - 1e-6 or top < margin - 1e-6 or right > size - margin + 1e-6 \
        or bottom > size - margin + 1e-6:
      return False
    if not SIZE_RANGE[0] * size - 1e-6 <= s.extent <= SIZE_RANGE[1] * size + 1e-6:
      return False
  if len(scene.shapes) == 2:
    a, b = scene.shapes
    if (a.colour, a.kind) == (b.colour, b.kind):
      return False
    if not boxes_separated(a, b, _px(GAP, size)):
      return False
    return relation_holds(a.centre, b.centre, scene.relation, CAPTION_RATIO, MIN_ALONG * size)
  return True


def sample_scene(rng: np.random.Generator, caption: str, size: int) -> Scene:
  """Random geometry for a caption (rejection sampling of sizes and positions)."""
  check(size >= 16, f"shapes image size {size} is too small; use at least 16")
  wanted = parse_caption(caption)
  lo, hi = SIZE_RANGE[0] * size, SIZE_RANGE[1] * size
  if len(wanted.shapes) == 1:
    s = wanted.shapes[0]
    return Scene((_place(rng, s.colour, s.kind, rng.uniform(lo, hi), size),))
  a, b = wanted.shapes
  check((a.colour, a.kind) != (b.colour, b.kind),
        f"caption {caption!r}: the two shapes must differ in colour or kind")
  for attempt in range(10_000):
    top = hi - (hi - lo) * min(1.0, attempt / 2000)  # shrink the largest size if stuck
    ea, eb = rng.uniform(lo, top), rng.uniform(lo, top)
    scene = Scene((_place(rng, a.colour, a.kind, ea, size),
                   _place(rng, b.colour, b.kind, eb, size)), wanted.relation)
    if scene_is_valid(scene, size):
      return scene
  raise RuntimeError(f"no layout found for {caption!r} at size {size}")  # never seen


def _inside(kind: str, x: np.ndarray, y: np.ndarray, box) -> np.ndarray:
  left, top, right, bottom = box
  cx, half = (left + right) / 2, (right - left) / 2
  if kind == "circle":
    cy = (top + bottom) / 2
    return (x - cx) ** 2 + (y - cy) ** 2 <= half ** 2
  if kind == "square":
    return (x >= left) & (x <= right) & (y >= top) & (y <= bottom)
  # Apex (cx, top), base from (left, bottom) to (right, bottom).
  return (y >= top) & (y <= bottom) & (np.abs(x - cx) <= (y - top) * half / (bottom - top))


def render_scene(scene: Scene, size: int) -> np.ndarray:
  """Anti-aliased rendering (4x4 sub-pixel coverage) of a scene: uint8 (size, size, 3)."""
  image = np.zeros((size, size, 3), np.float32)
  offsets = (np.arange(SUPERSAMPLE) + 0.5) / SUPERSAMPLE
  for s in scene.shapes:
    left, top, right, bottom = s.box
    j0, j1 = max(0, int(np.floor(left)) - 1), min(size, int(np.ceil(right)) + 1)
    i0, i1 = max(0, int(np.floor(top)) - 1), min(size, int(np.ceil(bottom)) + 1)
    xs = (np.arange(j0, j1)[:, None] + offsets[None, :]).reshape(-1)
    ys = (np.arange(i0, i1)[:, None] + offsets[None, :]).reshape(-1)
    inside = _inside(s.kind, xs[None, :], ys[:, None], s.box)
    coverage = inside.reshape(i1 - i0, SUPERSAMPLE, j1 - j0, SUPERSAMPLE).mean(axis=(1, 3))
    image[i0:i1, j0:j1] += coverage[..., None] * np.asarray(COLOURS[s.colour], np.float32)
  return np.clip(np.round(image), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- examples


def example_rng(seed: int, split: str, index: int) -> np.random.Generator:
  """The generator of example `index` of (`seed`, `split`)."""
  check(split in SPLITS, f"unknown shapes split {split!r}; valid: {list(SPLITS)}")
  return np.random.default_rng([int(seed), _SPLIT_IDS[split], int(index)])


def sample_caption(rng: np.random.Generator, split: str = "train",
                   two_shape_fraction: float = 0.5) -> str:
  """A caption of `split`: two shapes with probability `two_shape_fraction`."""
  kind = "two" if rng.random() < two_shape_fraction else "one"
  prompts = _prompts_for_split(split, kind)
  return prompts[rng.integers(len(prompts))]


def render_example(rng: np.random.Generator | int, size: int, caption: str | None = None,
                   split: str = "train", two_shape_fraction: float = 0.5
                   ) -> tuple[np.ndarray, str, Scene]:
  """One example: (image uint8 (size, size, 3), caption, scene).

  Args:
    rng: a numpy Generator, or an int seed for one.
    size: image side in pixels (>= 16).
    caption: draw this caption (any spelling the parser accepts); None samples one of
      `split` with `two_shape_fraction`.
    split: "train", "heldout" or "all" (only used to sample the caption).
    two_shape_fraction: probability of a two-shape caption when sampling.
  """
  if not isinstance(rng, np.random.Generator):
    rng = np.random.default_rng(rng)
  check(0.0 <= two_shape_fraction <= 1.0,
        f"two_shape_fraction={two_shape_fraction} must lie in [0, 1]")
  if caption is None:
    caption = sample_caption(rng, split, two_shape_fraction)
  scene = sample_scene(rng, caption, size)
  return render_scene(scene, size), scene.caption, scene


class CaptionedShapesSource:
  """`len()` / `[i]` -> {"image": uint8 (size, size, 3), "caption": str} and, with a
  tokenizer, "tokens": int32 (max_length,). Random access, deterministic per index.

  Args:
    size: image side in pixels.
    num_examples: length of the source (examples are generated on the fly).
    seed: dataset seed.
    split: "train" (no held-out caption), "heldout" (only held-out ones) or "all".
    two_shape_fraction: probability that an example has two shapes.
    tokenizer: optional callable like WordTokenizer: prompts -> (ids, mask, truncated).
    return_caption: include the caption string (default: only without a tokenizer).
  """

  def __init__(self, size: int, num_examples: int, seed: int = 0, split: str = "train",
               two_shape_fraction: float = 0.5, tokenizer=None,
               return_caption: bool | None = None):
    check(split in SPLITS, f"unknown shapes split {split!r}; valid: {list(SPLITS)}")
    check(int(size) >= 16, f"shapes image size {size} is too small; use at least 16")
    check(int(num_examples) > 0, f"shapes num_examples={num_examples} must be positive")
    check(0.0 <= two_shape_fraction <= 1.0,
          f"two_shape_fraction={two_shape_fraction} must lie in [0, 1]")
    self.size, self.num_examples, self.seed = int(size), int(num_examples), int(seed)
    self.split, self.two_shape_fraction = split, float(two_shape_fraction)
    self.tokenizer = tokenizer
    self.return_caption = tokenizer is None if return_caption is None else return_caption

  def __len__(self) -> int:
    return self.num_examples

  def example(self, index: int) -> tuple[np.ndarray, str, Scene]:
    """(image, caption, scene) of example `index`."""
    index = int(index)
    check(0 <= index < self.num_examples,
          f"shapes example index {index} out of range [0, {self.num_examples})")
    return render_example(example_rng(self.seed, self.split, index), self.size,
                          split=self.split, two_shape_fraction=self.two_shape_fraction)

  def __getitem__(self, index: int) -> dict:
    image, caption, _ = self.example(index)
    record = {"image": image}
    if self.return_caption:
      record["caption"] = caption
    if self.tokenizer is not None:
      ids = self.tokenizer([caption])[0]
      record["tokens"] = np.asarray(ids[0], np.int32)
    return record


# ----------------------------------------------------------------------------- prompt files


def write_prompts_file(path: str, prompts) -> None:
  """Writes prompts one per line (UTF-8)."""
  prompts = [str(p) for p in prompts]
  for p in prompts:
    check("\n" not in p and p.strip() and not p.strip().startswith("#"),
          f"prompt {p!r} cannot be written to a prompts file (empty, multi-line or a "
          "'#' comment)")
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    f.write("".join(p.strip() + "\n" for p in prompts))


def read_prompts_file(path: str) -> list[str]:
  """Prompts of a text file, one per line; blank lines and '#' comments are skipped."""
  check(os.path.isfile(path), f"prompts file {path!r} does not exist (one prompt per line)")
  with open(path, encoding="utf-8") as f:
    prompts = [line.strip() for line in f]
  prompts = [p for p in prompts if p and not p.startswith("#")]
  check(bool(prompts), f"prompts file {path!r} holds no prompts (one per line; blank lines "
        "and '#' comments are skipped)")
  return prompts
