"""Latent cache: write (two simulated processes), read back, fingerprints, refusals,
config checks and the Grain pipeline over a cache (`data.source = "latents"`)."""

import json
import os
import pickle
import time

import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.data import latents
from ldm_jax.data.pipeline import ArraySource, make_source, make_train_iterator
from ldm_jax.errors import UserError
from tests.helpers import tiny_config

N, SIZE, LATENT = 50, 8, (4, 4, 2)
VAE_INFO = {"name": "fake", "variant": "f2", "config": {"latent_channels": 2},
            "scaling_factor": 0.5, "shift_factor": 0.1}
SOURCE_INFO = {"source": "fake", "split": "train", "image_size": SIZE}


def _images():
  rng = np.random.default_rng(0)
  return rng.integers(0, 256, (N, SIZE, SIZE, 3), np.uint8), (np.arange(N) % 5).astype(np.int32)


_W = np.array([[0.7, -1.3], [0.2, 0.9], [-0.5, 0.4]])


def _moments(images):
  """Deterministic fake encoder (per example, whatever the batch): 2x2 mean-pool, mix
  3 -> 2 channels, scaled; returned as jax arrays, as a jitted encoder would."""
  x = np.asarray(images, np.float64) / 127.5 - 1
  b = x.shape[0]
  pooled = x.reshape(b, SIZE // 2, 2, SIZE // 2, 2, 3).mean(axis=(2, 4))
  mean = np.einsum("bhwi,io->bhwo", pooled, _W) * 3.1 + 0.123
  std = np.exp(pooled[..., :2] - 1.7)
  return {"mean": jnp.asarray((mean - VAE_INFO["shift_factor"]) * VAE_INFO["scaling_factor"],
                              jnp.float32),
          "std": jnp.asarray(std * VAE_INFO["scaling_factor"], jnp.float32)}


def _sample(images):
  return {"latent": _moments(images)["mean"] * 40.0}  # up to ~|200|: float16 rounding shows


def _write(out, store="mean_std", dtype="float32", encode=_moments, process_index=0,
           process_count=1, shard_size=20, fingerprint="ab" * 32, batch_size=7, **kw):
  images, labels = _images()
  batches = latents.source_batches(ArraySource(images, labels), batch_size,
                                   process_index=process_index, process_count=process_count)
  return latents.write_cache(str(out), batches, encode, store=store, dtype=dtype,
                             vae_info=VAE_INFO, fingerprint=fingerprint,
                             source_info=SOURCE_INFO, num_classes=5, shard_size=shard_size,
                             process_index=process_index, process_count=process_count, **kw)


def test_two_process_cache_reads_back_exactly(tmp_path):
  out = tmp_path / "cache"
  part0 = _write(out, process_index=0, process_count=2)
  assert part0["num_examples"] == 25 and [s["count"] for s in part0["shards"]] == [20, 5]
  with pytest.raises(UserError, match="incomplete latent cache.*2 shard files"):
    latents.read_manifest(str(out))  # process 1 not done, nothing finalised
  with pytest.raises(UserError, match=r"part-00001-of-00002.json.*missing.*barrier"):
    latents.finalize_cache(str(out), process_count=2)
  _write(out, process_index=1, process_count=2)
  manifest = latents.finalize_cache(str(out), process_count=2)
  assert sorted(os.listdir(out)) == ["manifest.json"] + [
      latents.shard_name(p, 2, s) for p in range(2) for s in range(2)]
  on_disk = latents.read_manifest(str(out))
  assert on_disk == manifest
  assert manifest["num_examples"] == N and manifest["latent_shape"] == list(LATENT)
  assert manifest["store"] == "mean_std" and manifest["dtype"] == "float32"
  assert [s["count"] for s in manifest["shards"]] == [20, 5, 20, 5]
  assert manifest["vae"] == VAE_INFO and manifest["source"] == SOURCE_INFO
  assert manifest["fingerprint"] == "ab" * 32 and manifest["num_classes"] == 5

  source = latents.LatentCacheSource(str(out))
  images, labels = _images()
  want = {k: np.asarray(v) for k, v in _moments(images).items()}
  assert len(source) == N
  for i in range(N):  # cache index i is source index i
    record = source[i]
    assert sorted(record) == ["label", "latent", "latent_std"]
    assert record["latent"].dtype == np.float32 and record["latent"].shape == LATENT
    np.testing.assert_array_equal(record["latent"], want["mean"][i])
    np.testing.assert_array_equal(record["latent_std"], want["std"][i])
    assert record["label"].dtype == np.int32 and record["label"] == labels[i]


@pytest.mark.parametrize("store", ["sample", "mean"])
def test_float16_storage(tmp_path, store):
  encode = _sample if store == "sample" else _moments
  manifest = _write(tmp_path / "c", store=store, dtype="float16", encode=encode, shard_size=17)
  assert [s["count"] for s in manifest["shards"]] == [17, 17, 16]
  source = latents.LatentCacheSource(str(tmp_path / "c"))
  images, _ = _images()
  want = np.asarray(encode(images)["latent" if store == "sample" else "mean"])
  got = np.stack([source[i]["latent"] for i in range(N)])
  assert got.dtype == np.float32 and "latent_std" not in source[0]
  np.testing.assert_array_equal(got, want.astype(np.float16).astype(np.float32))
  rel = np.abs(got - want).max() / np.abs(want).max()
  assert 0 < rel < 2 ** -11  # float16 rounding, and nothing worse


def test_fingerprint_is_stable_and_sensitive():
  rng = np.random.default_rng(0)
  params = {"encoder": {"conv_in": {"kernel": rng.normal(size=(3, 3, 3, 64)).astype(np.float32),
                                    "bias": np.zeros(64, np.float32)}},
            "decoder": {"big": {"kernel": rng.normal(size=(1000, 1000)).astype(np.float32)}}}
  config = {"kind": "kl", "latent_channels": 4, "block_out_channels": (32, 64)}
  fp = latents.vae_fingerprint(params, config)
  assert len(fp) == 64
  copy = {"params": {k: {m: {n: jnp.asarray(a) for n, a in v.items()} for m, v in sub.items()}
                     for k, sub in params.items()}}
  assert latents.vae_fingerprint(copy, dict(reversed(config.items()))) == fp
  changed = {**params, "decoder": {"big": {"kernel": params["decoder"]["big"]["kernel"].copy()}}}
  changed["decoder"]["big"]["kernel"][517, 3] += 1e-6
  assert latents.vae_fingerprint(changed, config) != fp
  assert latents.vae_fingerprint(params, {**config, "latent_channels": 8}) != fp
  as_bf16 = {**params, "encoder": {"conv_in": {
      "kernel": params["encoder"]["conv_in"]["kernel"].astype(jnp.bfloat16),
      "bias": params["encoder"]["conv_in"]["bias"]}}}
  assert latents.vae_fingerprint(as_bf16, config) != fp  # dtype counts
  start = time.perf_counter()
  latents.vae_fingerprint(params, config)
  assert time.perf_counter() - start < 1.0  # ~1M parameters


def test_refuses_to_overwrite(tmp_path):
  out = tmp_path / "cache"
  _write(out)
  before = sorted(os.listdir(out))
  with pytest.raises(UserError, match=r"'.*cache' already holds a latent cache.*refusing"):
    _write(out)
  assert sorted(os.listdir(out)) == before
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "notes.txt").write_text("mine")
  with pytest.raises(UserError, match=r"not empty.*notes.txt"):
    _write(tmp_path / "other")
  (tmp_path / "file").write_text("x")
  with pytest.raises(UserError, match="not a directory"):
    _write(tmp_path / "file")
  # An interrupted write (the encoder fails in the 3rd batch) leaves no committed part.
  calls = []

  def failing(images):
    calls.append(1)
    if len(calls) == 4:
      raise RuntimeError("device lost")
    return _moments(images)
  with pytest.raises(RuntimeError, match="device lost"):
    _write(tmp_path / "broken", encode=failing, shard_size=100)
  assert sorted(os.listdir(tmp_path / "broken")) == [latents.shard_name(0, 1, 0) + ".tmp"]
  with pytest.raises(UserError, match="incomplete latent cache.*1 shard file but no"):
    latents.read_manifest(str(tmp_path / "broken"))
  with pytest.raises(UserError, match="leftovers of an earlier, interrupted write"):
    _write(tmp_path / "broken")


def test_reader_errors(tmp_path):
  with pytest.raises(UserError, match="does not exist"):
    latents.read_manifest(str(tmp_path / "nope"))
  with pytest.raises(UserError, match="not a latent cache"):
    latents.read_manifest(str(tmp_path))
  out = tmp_path / "c"
  _write(out, process_index=1, process_count=2)
  with pytest.raises(UserError, match="incomplete latent cache.*encode again"):
    latents.LatentCacheSource(str(out))
  _write(out, process_index=0, process_count=2)
  latents.finalize_cache(str(out), process_count=2)
  path = out / "manifest.json"
  manifest = json.loads(path.read_text())
  path.write_text(json.dumps({**manifest, "version": 99}))
  with pytest.raises(UserError, match="version 99.*reads version 1"):
    latents.read_manifest(str(out))
  path.write_text(json.dumps({**manifest, "num_examples": 51}))
  with pytest.raises(UserError, match="hold 50 records.*says 51"):
    latents.LatentCacheSource(str(out))


def test_writer_rejects_bad_encodings(tmp_path):
  with pytest.raises(UserError, match=r"store='mean_std' needs.*\['mean', 'std'\].*\['latent'\]"):
    _write(tmp_path / "a", encode=_sample)
  with pytest.raises(UserError, match="non-finite 'latent'.*float16.*65504"):
    _write(tmp_path / "b", store="sample", dtype="float16",
           encode=lambda x: {"latent": _sample(x)["latent"] * 1000})
  with pytest.raises(UserError, match=r"label \[5\] out of range.*num_classes=5"):
    latents.write_cache(str(tmp_path / "c"), [{"image": np.zeros((2, 8, 8, 3), np.uint8),
                                                "label": np.array([1, 5])}],
                        _moments, store="mean_std", vae_info={}, fingerprint="x",
                        source_info={}, num_classes=5)
  with pytest.raises(UserError, match=r"non-finite 'mean' \(as float32\) for example 3 of "
                     r"process 0$"):
    _write(tmp_path / "e", batch_size=50,
           encode=lambda x: {**_moments(x), "mean": _moments(x)["mean"].at[3, 1].set(jnp.nan)})
  with pytest.raises(UserError, match="store 'mode'.*valid"):
    _write(tmp_path / "d", store="mode")


def test_captions_are_kept(tmp_path):
  images, labels = _images()
  batches = [{"image": images[:3], "label": labels[:3], "caption": ["a cat", "ünïcode", ""]}]
  manifest = latents.write_cache(str(tmp_path / "c"), batches, _sample, store="sample",
                                 vae_info={}, fingerprint="x", source_info={}, num_classes=5)
  assert manifest["captions"] and manifest["num_examples"] == 3
  source = latents.LatentCacheSource(str(tmp_path / "c"))
  assert [source[i]["caption"] for i in range(3)] == ["a cat", "ünïcode", ""]


def test_check_cache_names_the_config_keys(tmp_path):
  manifest = _write(tmp_path / "c")
  latents.check_cache(manifest, fingerprint="ab" * 32, latent_channels=2, latent_size=4,
                      num_classes=5)
  with pytest.raises(UserError, match=r"different VAE \(fake/f2, fingerprint abababababab\).*"
                     r"fingerprint 0123456789ab\)"):
    latents.check_cache(manifest, fingerprint="0123456789abcdef" * 4)
  with pytest.raises(UserError, match="2-channel.*data.channels=4; set data.channels=2"):
    latents.check_cache(manifest, latent_channels=4)
  with pytest.raises(UserError, match="4x4 latents.*data.image_size=32; set data.image_size=4"):
    latents.check_cache(manifest, latent_size=32)
  with pytest.raises(UserError, match="5 classes.*data.num_classes=10; set data.num_classes=5"):
    latents.check_cache(manifest, num_classes=10)


def _latent_config(cache, **overrides):
  return tiny_config(**{"data.source": "latents", "data.latent_cache": str(cache),
                        "data.image_size": 4, "data.channels": 2, "data.num_classes": 5,
                        **overrides}).data


def test_pipeline_over_latent_cache(tmp_path):
  out = tmp_path / "c"
  _write(out)
  data = _latent_config(out)
  source = make_source(data)
  assert isinstance(source, latents.LatentCacheSource) and len(source) == N
  # Grain worker processes (data.worker_count > 0) receive the source pickled.
  clone = pickle.loads(pickle.dumps(source))
  np.testing.assert_array_equal(clone[7]["latent"], source[7]["latent"])
  it = make_train_iterator(data, 8, seed=0)
  batch = next(it)
  assert sorted(batch) == ["label", "latent", "latent_std"]
  assert batch["latent"].shape == (8, *LATENT) and batch["latent"].dtype == np.float32
  assert batch["latent_std"].shape == (8, *LATENT) and batch["label"].dtype == np.int32
  images, labels = _images()
  want = np.asarray(_moments(images)["mean"])
  for latent, label in zip(batch["latent"], batch["label"]):  # each row is some example
    i = int(np.argmin(np.abs(want - latent).reshape(N, -1).sum(1)))
    np.testing.assert_array_equal(want[i], latent)
    assert labels[i] == label
  for _ in range(8):  # into the second epoch (6 batches of 8 per epoch)
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  fresh = make_train_iterator(data, 8, seed=0)
  fresh.set_state(state)
  for want_batch in expected:
    got = next(fresh)
    for key in want_batch:
      np.testing.assert_array_equal(got[key], want_batch[key])
  # Two processes: contiguous halves of the one-process batch, as for images.
  whole = make_train_iterator(data, 8, seed=3, process_index=0, process_count=1)
  halves = [make_train_iterator(data, 8, seed=3, process_index=p, process_count=2)
            for p in range(2)]
  global_batch, parts = next(whole), [next(h) for h in halves]
  for key in global_batch:
    np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), global_batch[key])


def test_pipeline_config_errors(tmp_path):
  with pytest.raises(UserError, match="needs data.latent_cache=DIR"):
    make_source(tiny_config(**{"data.source": "latents"}).data)  # key absent: old configs
  out = tmp_path / "c"
  _write(out)
  with pytest.raises(UserError, match="set data.channels=2"):
    make_source(_latent_config(out, **{"data.channels": 4}))
  with pytest.raises(UserError, match="set data.image_size=4"):
    make_source(_latent_config(out, **{"data.image_size": 32}))
  with pytest.raises(UserError, match="set data.num_classes=5"):
    make_source(_latent_config(out, **{"data.num_classes": 10}))
  with pytest.raises(UserError, match="does not exist"):
    make_source(_latent_config(tmp_path / "missing"))


def test_caption_cache_feeds_a_word_tokenizer(tmp_path):
  """data.tokenizer = shapes-words over a captioned latent cache: each record gets the
  tokens of its own caption (the model's text encoder reads them); a cache without
  captions is refused, naming the flag."""
  from ldm_jax.data.text import tokenizer_for
  images, _ = _images()
  captions = ["a red circle", "a blue square left of a green triangle", "a yellow square"]
  batches = [{"image": images[:3], "caption": captions}]
  latents.write_cache(str(tmp_path / "c"), batches, _sample, store="sample", vae_info={},
                      fingerprint="x", source_info={}, num_classes=0)
  data = _latent_config(tmp_path / "c", **{"data.num_classes": 0,
                                           "data.tokenizer": "shapes-words",
                                           "data.max_tokens": 12})
  source = make_source(data)
  tokenizer = tokenizer_for(data)
  for i, caption in enumerate(captions):
    record = source[i]
    assert record["caption"] == caption and record["tokens"].dtype == np.int32
    np.testing.assert_array_equal(record["tokens"], tokenizer([caption])[0][0])
  assert len(set(source[i]["tokens"].tobytes() for i in range(3))) == 3
  _write(tmp_path / "plain")
  with pytest.raises(UserError, match="data.tokenizer='shapes-words' reads the captions.*has none"):
    make_source(_latent_config(tmp_path / "plain", **{"data.tokenizer": "shapes-words"}))
