"""Captioned shapes: the procedural dataset (captions that hold, held-out split,
determinism, grain batching), the word tokenizer and the colour/shape/position judge."""

import json
import logging

import grain
import numpy as np
import pytest
import scipy.ndimage

from ldm_jax.data import shapes
from ldm_jax.data.word_tokenizer import SHAPES_VOCAB, WordTokenizer
from ldm_jax.errors import UserError
from ldm_jax.evaluation import shapes_judge

ROTATE = {"left of": "above", "right of": "below", "above": "right of", "below": "left of"}


def _examples(size, n, seed=0, split="all"):
  source = shapes.CaptionedShapesSource(size, n, seed=seed, split=split)
  return [source.example(i) for i in range(n)]


def _degrade(image, rng, blur=1.0, noise=10.0):
  x = scipy.ndimage.gaussian_filter(image.astype(np.float64), (blur, blur, 0))
  x = x + rng.normal(0.0, noise, x.shape)
  return np.clip(np.round(x), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- dataset


def test_captions_hold_for_the_rendered_shapes():
  size = 64
  kinds = {"one": 0, "two": 0}
  for image, caption, scene in _examples(size, 600, seed=1):
    assert image.shape == (size, size, 3) and image.dtype == np.uint8
    assert shapes.parse_caption(caption).caption == caption == scene.caption
    kinds["one" if len(scene.shapes) == 1 else "two"] += 1
    masks = []
    for s in scene.shapes:
      left, top, right, bottom = s.box
      assert 1 <= left and right <= size - 1 and 1 <= top and bottom <= size - 1  # inside
      assert 0.2 * size - 1e-6 <= s.extent <= 0.4 * size + 1e-6
      alone = shapes.render_scene(shapes.Scene((s,)), size)
      mask = alone.max(-1) > 0
      masks.append(mask)
      # The shape is drawn in its pure colour, centred where the spec says.
      ys, xs = np.nonzero(mask)
      weight = alone.max(-1)[mask].astype(np.float64)
      centre = ((xs + 0.5) @ weight / weight.sum(), (ys + 0.5) @ weight / weight.sum())
      np.testing.assert_allclose(centre, s.centre, atol=0.15)
      assert tuple(alone[ys, xs].max(0)) == shapes.COLOURS[s.colour]
    if len(scene.shapes) == 2:
      a, b = scene.shapes
      assert (a.colour, a.kind) != (b.colour, b.kind)
      # No overlap, and a gap of >= 3 px: dilating one shape by 2 px misses the other.
      assert not (scipy.ndimage.binary_dilation(masks[0], iterations=2) & masks[1]).any()
      # The relation holds by centres, clearly (within ~34 degrees of the axis).
      dx, dy = b.centre[0] - a.centre[0], b.centre[1] - a.centre[1]
      along, across = {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx),
                       "below": (-dy, dx)}[scene.relation]
      assert along >= 1.5 * abs(across) and along >= 0.15 * size, (caption, dx, dy)
      np.testing.assert_array_equal(image, np.maximum(*[
          shapes.render_scene(shapes.Scene((s,)), size) for s in scene.shapes]))
  assert kinds["one"] > 250 and kinds["two"] > 250, kinds


def test_heldout_split():
  one, two = shapes.heldout_prompts("one"), shapes.heldout_prompts("two")
  assert one == ["a red triangle", "a green square", "a blue circle"]
  assert len(two) == 52 and len(shapes.all_prompts("two")) == 528
  assert len(shapes.training_prompts("one")) == 9 and len(shapes.training_prompts("two")) == 476
  # A held-out scene is held out in both wordings.
  for prompt in two:
    scene = shapes.parse_caption(prompt)
    mirror = shapes.Scene(scene.shapes[::-1], shapes.INVERSE[scene.relation]).caption
    assert mirror in two
  # The held-out one-shape pairs still appear inside two-shape training captions.
  train_two = " | ".join(shapes.training_prompts("two"))
  assert all(p in train_two for p in one)
  assert shapes.is_heldout("A Red Triangle.") and not shapes.is_heldout("a red circle")
  assert shapes.is_heldout(two[0].upper()) and not shapes.is_heldout(shapes.training_prompts()[0])
  held = set(one + two)
  train = [shapes.sample_caption(shapes.example_rng(0, "train", i), "train")
           for i in range(5000)]
  assert not held & set(train)
  assert len(set(train)) > 400  # the training captions are covered
  source = shapes.CaptionedShapesSource(32, 5000, split="train")
  assert [source[i]["caption"] for i in range(100)] == train[:100]  # the source's captions
  heldout = shapes.CaptionedShapesSource(32, 300, seed=4, split="heldout")
  captions = [heldout[i]["caption"] for i in range(300)]
  assert set(captions) <= held and len(set(captions)) > 30
  assert set(one) <= set(captions)


def test_examples_are_deterministic_and_index_addressed():
  a = shapes.CaptionedShapesSource(64, 100, seed=3)
  b = shapes.CaptionedShapesSource(64, 100, seed=3)
  c = shapes.CaptionedShapesSource(64, 100, seed=4)
  for i in (0, 7, 99, 7):
    assert a[i]["image"].tobytes() == b[i]["image"].tobytes() and a[i]["caption"] == b[i]["caption"]
  assert any(a[i]["image"].tobytes() != c[i]["image"].tobytes() for i in range(5))
  assert a[np.int64(5)]["caption"] == a[5]["caption"]
  image, caption, _ = shapes.render_example(123, 64)
  image2, caption2, _ = shapes.render_example(np.random.default_rng(123), 64)
  assert caption == caption2 and np.array_equal(image, image2)
  with pytest.raises(UserError, match="out of range"):
    a[100]
  with pytest.raises(UserError, match="'test'.*valid"):
    shapes.CaptionedShapesSource(64, 10, split="test")


@pytest.mark.parametrize("size", [24, 48, 100, 200])
def test_non_default_sizes(size):
  for image, caption, scene in _examples(size, 40, seed=size):
    assert image.shape == (size, size, 3)
    assert shapes.scene_is_valid(scene, size)
    assert shapes_judge.judge(image, caption)["correct"], caption


def test_render_a_given_caption():
  image, caption, scene = shapes.render_example(0, 64, caption="A yellow square, below a blue triangle.")
  assert caption == "a yellow square below a blue triangle"
  assert scene.shapes[0].centre[1] > scene.shapes[1].centre[1]  # y grows downwards
  assert shapes_judge.judge(image, caption)["correct"]
  # Float images in [0, 1] or [-1, 1] (a model's output range) are judged alike.
  assert shapes_judge.judge(image / 255.0, caption)["correct"]
  assert shapes_judge.judge(image / 127.5 - 1.0, caption)["correct"]
  assert not shapes_judge.judge(image / 127.5 - 1.0, "a yellow square above a blue triangle")[
      "correct"]
  with pytest.raises(UserError, match="differ in colour or kind"):
    shapes.render_example(0, 64, caption="a red circle above a red circle")


def test_parse_caption():
  for prompt in shapes.all_prompts("one") + shapes.all_prompts("two"):
    assert shapes.parse_caption(prompt).caption == prompt
  scene = shapes.parse_caption("  A GREEN circle   RIGHT of a red square. ")
  assert scene.relation == "right of"
  assert [(s.colour, s.kind) for s in scene.shapes] == [("green", "circle"), ("red", "square")]
  for bad in ["", "a purple circle", "red circle", "a red circle next to a blue square",
              "a red circle left a blue square", "a red circle above", "a red circle above a",
              "a red circle above a blue square please"]:
    with pytest.raises(UserError, match="cannot parse.*grammar"):
      shapes.parse_caption(bad)


def test_prompts_files(tmp_path):
  path = tmp_path / "sub" / "prompts.txt"
  shapes.write_prompts_file(str(path), shapes.heldout_prompts("one"))
  assert shapes.read_prompts_file(str(path)) == shapes.heldout_prompts("one")
  path.write_text("# held out\n\n a red circle \n#x\na blue square left of a red circle\n")
  assert shapes.read_prompts_file(str(path)) == [
      "a red circle", "a blue square left of a red circle"]
  path.write_text("# only a comment\n\n")
  with pytest.raises(UserError, match="holds no prompts"):
    shapes.read_prompts_file(str(path))
  with pytest.raises(UserError, match="does not exist"):
    shapes.read_prompts_file(str(tmp_path / "missing.txt"))
  with pytest.raises(UserError, match="cannot be written"):
    shapes.write_prompts_file(str(path), ["two\nlines"])


def test_source_through_grain_batching():
  source = shapes.CaptionedShapesSource(32, 10, seed=2)
  batch = grain.MapDataset.source(source).batch(4)[1]
  assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == np.uint8
  assert list(batch["caption"]) == [source[i]["caption"] for i in range(4, 8)]
  tokenizer = WordTokenizer.for_shapes()
  tokens = shapes.CaptionedShapesSource(32, 10, seed=2, tokenizer=tokenizer)
  batch = next(iter(grain.MapDataset.source(tokens).shuffle(seed=0).batch(5)
                    .to_iter_dataset()))
  assert set(batch) == {"image", "tokens"}
  assert batch["tokens"].shape == (5, 12) and batch["tokens"].dtype == np.int32
  captions = tokenizer.decode(batch["tokens"])
  for image, caption in zip(batch["image"], captions):  # tokens belong to their image
    assert shapes_judge.judge(image, caption)["correct"]


# ----------------------------------------------------------------------------- tokenizer


def test_word_tokenizer(tmp_path, caplog):
  tok = WordTokenizer(SHAPES_VOCAB, max_length=6)
  assert tok.vocab_size == 4 + len(SHAPES_VOCAB) == 17
  word = {w: i + 4 for i, w in enumerate(SHAPES_VOCAB)}
  with caplog.at_level(logging.WARNING):
    ids, mask, truncated = tok(["A red circle.", "a blue square left of a red, circle"])
  np.testing.assert_array_equal(ids[0], [1, word["a"], word["red"], word["circle"], 2, 0])
  np.testing.assert_array_equal(ids[1], [1, word["a"], word["blue"], word["square"],
                                         word["left"], 2])
  np.testing.assert_array_equal(mask, [[1, 1, 1, 1, 1, 0], [1] * 6])
  assert ids.dtype == np.int32 and truncated == ["", "of a red circle"]
  assert "this part was truncated: 'of a red circle'" in caplog.text
  with caplog.at_level(logging.WARNING):
    enc = tok.encode(["a pink circle", "a red hexagon"])
  assert enc.unknown == [["pink"], ["hexagon"]] and enc.truncated == ["", ""]
  assert enc.ids[0, 2] == 3 and enc.ids[1, 3] == 3  # unk
  assert "['hexagon', 'pink'] are not in the tokenizer's vocabulary" in caplog.text
  with pytest.raises(UserError, match=r"\['pink'\].*vocabulary.*'triangle'"):
    tok(["a pink circle"], strict=True)
  assert tok.decode(ids[:1]) == ["a red circle"]
  # Save / load round trip.
  path = tok.save(str(tmp_path / "ckpt"))
  assert json.load(open(path))["vocab"] == list(SHAPES_VOCAB)
  loaded = WordTokenizer.load(str(tmp_path / "ckpt"))
  assert loaded.vocab == tok.vocab and loaded.max_length == 6
  np.testing.assert_array_equal(loaded(["a red circle"])[0], ids[:1])
  with pytest.raises(UserError, match="no word tokenizer"):
    WordTokenizer.load(str(tmp_path))
  with pytest.raises(UserError, match="repeats"):
    WordTokenizer(["a", "a"], 5)
  with pytest.raises(UserError, match="max_length=2"):
    WordTokenizer(["a"], 2)
  with pytest.raises(UserError, match="special tokens"):
    WordTokenizer(["<unk>"], 5)
  # Every shapes caption fits the default shapes tokenizer without unknown words.
  enc = WordTokenizer.for_shapes().encode(shapes.all_prompts("two"))
  assert not any(enc.truncated) and not any(enc.unknown)


# ----------------------------------------------------------------------------- judge


@pytest.mark.parametrize("size", [32, 64, 256])
def test_judge_accepts_ground_truth(size):
  examples = _examples(size, 400, seed=11)
  result = shapes_judge.score([e[0] for e in examples], [e[1] for e in examples])
  assert result["n"] == 400 and result["n_two"] > 150 and result["n_one"] > 150
  # Measured: 1.0 at every size.
  assert result["accuracy"] >= 0.99, result
  assert result["relation"] >= 0.99 and result["count"] >= 0.99, result


def _wrong_captions(scene, rng):
  """{how: a caption that does NOT describe the scene}."""
  shapes_ = list(scene.shapes)
  out = {}
  i = int(rng.integers(len(shapes_)))

  def distinct(new):
    return len(new) == 1 or (new[0].colour, new[0].kind) != (new[1].colour, new[1].kind)

  for how in ("colour", "shape"):
    options = ([c for c in shapes.COLOURS if c != shapes_[i].colour] if how == "colour"
               else [k for k in shapes.KINDS if k != shapes_[i].kind])
    for value in rng.permutation(options):
      new = list(shapes_)
      new[i] = shapes.Shape(str(value) if how == "colour" else shapes_[i].colour,
                            str(value) if how == "shape" else shapes_[i].kind)
      if distinct(new):
        out[how] = shapes.Scene(tuple(new), scene.relation).caption
        break
  if len(shapes_) == 1:
    extra = shapes.Shape("blue" if shapes_[0].colour != "blue" else "red", shapes_[0].kind)
    out["count"] = shapes.Scene((shapes_[0], extra), "above").caption
  else:
    a, b = shapes_
    out["count"] = shapes.Scene((a,)).caption
    out["relation"] = shapes.Scene((a, b), shapes.INVERSE[scene.relation]).caption
    out["rotated"] = shapes.Scene((a, b), ROTATE[scene.relation]).caption
    if a.colour != b.colour and a.kind != b.kind:  # binding: colours swapped
      out["swap"] = shapes.Scene((shapes.Shape(b.colour, a.kind),
                                  shapes.Shape(a.colour, b.kind)), scene.relation).caption
  return out


def test_judge_rejects_wrong_captions():
  rng = np.random.default_rng(0)
  by_how = {}
  for image, caption, scene in _examples(64, 400, seed=12):
    for how, wrong in _wrong_captions(scene, rng).items():
      assert wrong != caption
      by_how.setdefault(how, []).append(shapes_judge.judge(image, wrong)["correct"])
  assert set(by_how) == {"colour", "shape", "count", "relation", "rotated", "swap"}
  for how, results in by_how.items():
    assert len(results) >= 50, how
    # Measured: 0.0 for every kind of mistake.
    assert np.mean(results) <= 0.05, (how, np.mean(results))


def test_judge_is_robust_to_blur_and_noise():
  rng = np.random.default_rng(0)
  examples = _examples(64, 400, seed=13)
  images = [_degrade(e[0], rng, blur=1.0, noise=10.0) for e in examples]
  result = shapes_judge.score(images, [e[1] for e in examples])
  # Measured: 1.0 (also 1.0 at blur 1.5 / noise 10 and blur 1 / noise 20).
  assert result["accuracy"] >= 0.98, result
  # A wrong caption still fails on the degraded image.
  wrong = [_wrong_captions(e[2], rng)["shape"] for e in examples[:100]]
  assert shapes_judge.score(images[:100], wrong)["accuracy"] <= 0.05


def test_judge_rejects_what_is_not_a_shape_of_the_grammar():
  size = 64
  yy, xx = np.mgrid[:size, :size] + 0.5

  def image_with(*fills):
    image = np.zeros((size, size, 3), np.uint8)
    for mask, colour in fills:
      image[mask] = colour
    return image

  square = (np.abs(xx - 20) < 9) & (np.abs(yy - 20) < 9)
  disc = (xx - 45) ** 2 + (yy - 45) ** 2 < 81
  assert shapes_judge.judge(image_with((square, (255, 0, 0))), "a red square")["correct"]
  checks = {
      "a red square": [image_with((square, (255, 255, 255))),      # white
                       image_with((square, (0, 255, 255))),        # cyan
                       image_with((square & ~((np.abs(xx - 20) < 5) & (np.abs(yy - 20) < 5)),
                                   (255, 0, 0))),                   # a frame
                       image_with(((np.abs(xx - 30) < 20) & (np.abs(yy - 20) < 6),
                                   (255, 0, 0))),                   # a long rectangle
                       image_with((square, (255, 0, 0)), (disc, (255, 255, 255))),  # extra
                       np.zeros((size, size, 3), np.uint8),         # empty
                       ],
      "a red circle": [image_with((((xx - 32) / 22) ** 2 + ((yy - 32) / 9) ** 2 < 1,
                                   (255, 0, 0)))],                  # an ellipse
  }
  for prompt, images in checks.items():
    for image in images:
      result = shapes_judge.judge(image, prompt)
      assert not result["correct"] and result["reasons"], (prompt, result)
  # Two shapes of one colour are two components; the relation uses their centres.
  two_red = image_with((square, (255, 0, 0)), (disc, (255, 0, 0)))
  assert shapes_judge.judge(two_red, "a red square above a red circle")["correct"]
  assert shapes_judge.judge(two_red, "a red circle below a red square")["correct"]
  result = shapes_judge.judge(two_red, "a red circle above a red square")
  assert not result["correct"] and result["objects"] and result["relation"] is False
  result = shapes_judge.judge(two_red, "a red square")
  assert not result["correct"] and not result["count"] and result["colour"]
  # Per-attribute diagnosis.
  scores = shapes_judge.score([two_red, two_red], ["a red square above a red circle",
                                                   "a blue square above a red circle"])
  assert scores["accuracy"] == 0.5 and scores["colour"] == 0.5 and scores["shape"] == 1.0
  assert scores["count"] == 1.0 and scores["relation"] == 0.5
  assert np.isnan(scores["accuracy_one"]) and scores["accuracy_two"] == 0.5
  with pytest.raises(UserError, match="cannot parse"):
    shapes_judge.judge(two_red, "a red blob")
