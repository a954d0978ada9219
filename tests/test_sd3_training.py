"""configs/mmdit_256.py's default (SD3) preset end to end on a tiny random SD3 pipeline:
caption folder -> latent + text-embedding cache (sharded, fingerprinted) -> training
with per-encoder dropout -> prompts sampled and decoded; plus its requirement errors.

The cache's embeddings are compared with diffusers' own `encode_prompt` of the same
pipeline (torch), so the condition a model trains on is SD3's.
"""

import json
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ldm_jax.data import latents  # noqa: E402
from ldm_jax.data.shapes import render_example, write_prompts_file  # noqa: E402
from ldm_jax.errors import UserError  # noqa: E402
from ldm_jax.pipelines.sd3_text import (ENCODER_PARTS, PART_KEYS, assemble_parts,  # noqa: E402
                                        drop_encoders)
from ldm_jax.run_config import override  # noqa: E402
from tests.helpers import load_config  # noqa: E402
from tests.sd3_fixtures import tiny_sd3_pipeline  # noqa: E402

NUM_IMAGES = 8
T5_LENGTH = 8


def _config(pipeline, **overrides):
  config = load_config("configs/mmdit_256.py", "")
  config.data.image_size = 8        # 16 px images / the tiny VAE's factor 2
  config.data.channels = 4
  config.data.batch_size = 8
  config.data.worker_count = 0
  config.data.max_tokens = T5_LENGTH
  config.data.text_pipeline = os.path.join(pipeline, "pipeline")
  config.model.variant = "tiny"
  config.model.pooled_dim = 48      # the tiny CLIP projections: 16 + 32
  config.model.dtype = "float32"
  config.model.remat = "none"
  config.model.attention = "xla"
  config.cache.vae = os.path.join(pipeline, "pipeline", "vae")
  config.cache.image_size = 16
  config.cache.batch_size = 3       # batches of 3, 3, 2: a short last batch
  config.cache.shard_size = 5       # two shards
  # cache.dtype: the preset's float16 (parts travel to the step as float16)
  config.num_train_steps = 3
  config.log_every_steps = 1
  config.ckpt.every_steps = 3
  config.eval.every_steps = 0
  config.optim.warmup_steps = 0
  config.optim.learning_rate = 1e-3
  config.sample.num = 2
  config.sample.batch_size = 2
  config.sample.num_steps = 2
  config.sample.guidance_scale = 2.0
  return override(config, **overrides)


@pytest.fixture(scope="module")
def sd3_setup(tmp_path_factory):
  """(torch pipeline, its folder's parent, caption folder, captions, cache dir)."""
  root = str(tmp_path_factory.mktemp("sd3_train"))
  pipe, _ = tiny_sd3_pipeline(root)
  images = os.path.join(root, "images")
  os.makedirs(os.path.join(images, "sub"))
  captions = []
  for i in range(NUM_IMAGES):
    image, caption, _ = render_example(i, 16)
    folder = images if i % 2 else os.path.join(images, "sub")
    from PIL import Image
    Image.fromarray(image).save(os.path.join(folder, f"img{i}.png"))
    with open(os.path.join(folder, f"img{i}.txt"), "w", encoding="utf-8") as f:
      f.write(caption + "\n")
    captions.append(caption)
  from ldm_jax.first_stage import cache_latents
  cache = os.path.join(root, "cache")
  manifest = cache_latents(_config(root, **{"data.folder": images}), os.path.join(root, "w"),
                           cache)
  return pipe, root, images, manifest, cache


def test_cache_holds_diffusers_sd3_embeddings(sd3_setup):
  pipe, root, _, manifest, cache = sd3_setup
  assert manifest["num_examples"] == NUM_IMAGES and len(manifest["shards"]) == 2
  assert manifest["latent_shape"] == [8, 8, 4] and manifest["num_classes"] == 0
  text = manifest["text"]
  assert text["parts"] == {"clip_l": [77, 16], "clip_g": [77, 24], "t5": [T5_LENGTH, 32],
                           "pooled_l": [16], "pooled_g": [32]}
  assert len(text["info"]["fingerprint"]) == 64 and text["info"]["max_sequence_length"] == 8
  source = latents.LatentCacheSource(cache)
  records = [source[i] for i in range(NUM_IMAGES)]
  assert "label" not in records[0] and set(PART_KEYS) <= set(records[0])
  # The cache order is sorted paths: images/img1.png, ..., images/sub/img0.png, ...
  captions = [r["caption"] for r in records]
  with torch.no_grad():
    context, _, pooled, _ = pipe.encode_prompt(
        captions, captions, captions, do_classifier_free_guidance=False,
        max_sequence_length=T5_LENGTH)
    null_context, _, null_pooled, _ = pipe.encode_prompt(
        "", "", "", do_classifier_free_guidance=False, max_sequence_length=T5_LENGTH)
  assert records[0]["t5"].dtype == np.float16 and manifest["dtype"] == "float16"
  # float16 storage: 2^-11 relative rounding of each value.
  ours_context, ours_pooled = assemble_parts(
      {k: np.stack([r[k] for r in records]).astype(np.float32) for k in PART_KEYS})
  np.testing.assert_allclose(np.asarray(ours_context), context.numpy(), rtol=1e-3, atol=1e-4)
  np.testing.assert_allclose(np.asarray(ours_pooled), pooled.numpy(), rtol=1e-3, atol=1e-4)
  null = latents.read_null_text(cache)
  null_ctx, null_pool = assemble_parts({k: v[None].astype(np.float32) for k, v in null.items()})
  np.testing.assert_allclose(np.asarray(null_ctx), null_context.numpy(), rtol=1e-3, atol=1e-4)
  np.testing.assert_allclose(np.asarray(null_pool), null_pooled.numpy(), rtol=1e-3, atol=1e-4)
  # The null condition: zeros (default) or the cache's empty-prompt parts.
  from ldm_jax.data.text import null_condition
  config = _config(root, **{"data.latent_cache": cache})
  zeros = null_condition(config.data)
  assert all(np.all(zeros[k] == 0) and zeros[k].shape == null[k].shape for k in PART_KEYS)
  empty = null_condition(override(config, **{"data.null_text": "empty"}).data)
  assert all(np.array_equal(empty[k], null[k].astype(np.float32)) for k in PART_KEYS)
  with pytest.raises(UserError, match="null_text"):
    null_condition(override(config, **{"data.null_text": "blank"}).data)
  # Training refuses text settings other than the cache's.
  from ldm_jax.training.setup import build_training
  with pytest.raises(UserError, match="max_sequence_length: config 9 vs cache 8"):
    build_training(_config(root, **{"data.latent_cache": cache, "data.max_tokens": 9}))
  # A second write into the complete cache is refused; nothing is overwritten.
  from ldm_jax.first_stage import cache_latents
  before = os.path.getmtime(os.path.join(cache, latents.MANIFEST))
  with pytest.raises(UserError, match="already holds a latent cache"):
    cache_latents(_config(root, **{"data.folder": os.path.join(root, "images")}),
                  os.path.join(root, "w"), cache)
  assert os.path.getmtime(os.path.join(cache, latents.MANIFEST)) == before


def test_drop_encoders_is_per_encoder_and_independent():
  n = 4096
  rng = np.random.default_rng(0)
  parts = {"clip_l": rng.normal(size=(n, 3, 4)) + 5, "clip_g": rng.normal(size=(n, 3, 6)) + 5,
           "t5": rng.normal(size=(n, 2, 8)) + 5, "pooled_l": rng.normal(size=(n, 4)) + 5,
           "pooled_g": rng.normal(size=(n, 6)) + 5}
  parts = {k: v.astype(np.float32) for k, v in parts.items()}
  null = {k: np.full(v.shape[1:], -1.0, np.float32) for k, v in parts.items()}
  out = jax.device_get(drop_encoders(parts, null, 0.464, jax.random.key(3)))
  dropped = {}
  for encoder, keys in ENCODER_PARTS.items():
    flags = [np.all(out[k] == -1.0, axis=tuple(range(1, out[k].ndim))) for k in keys]
    kept = [np.array_equal(out[k][~flags[0]], parts[k][~flags[0]]) for k in keys]
    assert all(np.array_equal(f, flags[0]) for f in flags) and all(kept), encoder
    dropped[encoder] = flags[0]
    assert abs(flags[0].mean() - 0.464) < 0.03, (encoder, flags[0].mean())
  everything = dropped["clip_l"] & dropped["clip_g"] & dropped["t5"]
  assert abs(everything.mean() - 0.464 ** 3) < 0.02  # independent: ~10 % unconditional
  assert not np.array_equal(dropped["clip_l"], dropped["t5"])


def test_encoder_dropout_runs_in_the_training_step(sd3_setup):
  """With random weights, a step with every encoder dropped (p -> 1) has the loss of a batch whose
  condition is the null's (zeros); the same step with p = 0 does not."""
  from ldm_jax.data.pipeline import make_train_iterator
  from ldm_jax.training import sharding
  from ldm_jax.training.setup import build_training
  _, root, _, _, cache = sd3_setup

  def setup_for(p):
    return build_training(_config(root, **{"data.latent_cache": cache,
                                           "model.text_encoder_dropout": p,
                                           "sample.guidance_scale": 1.0}))

  keep, drop = setup_for(0.0), setup_for(0.99999)
  batch = next(make_train_iterator(keep.config.data, 8, 0, 0, 1))
  zeroed = {k: (np.zeros_like(v) if k in PART_KEYS else v) for k, v in batch.items()}

  def second_loss(setup, second_batch):
    with jax.set_mesh(keep.mesh):
      frozen = keep.load_frozen()
      state = keep.init_state()
      # Random weights everywhere: at initialisation adaLN-Zero's zero gates and final
      # layer make the output ignore the condition.
      perturb = jax.jit(lambda params: jax.tree_util.tree_map(
          lambda a, k: a + 0.05 * jax.random.normal(k, a.shape, a.dtype), params,
          jax.tree_util.tree_unflatten(
              jax.tree_util.tree_structure(params),
              list(jax.random.split(jax.random.key(1),
                                    len(jax.tree_util.tree_leaves(params)))))),
          out_shardings=keep.state_shardings.params)
      state = state.replace(params=perturb(state.params))
      _, metrics = setup.jit_step()(state, sharding.put_batch(second_batch,
                                                              setup.batch_sharding), frozen)
    return float(metrics["loss"])

  dropped, null, kept = (second_loss(drop, batch), second_loss(keep, zeroed),
                         second_loss(keep, batch))
  assert dropped == pytest.approx(null, rel=1e-5)
  assert abs(kept - null) > 1e-4 * abs(null)


def test_sd3_preset_trains_and_samples_from_the_cache(sd3_setup, tmp_path):
  from ldm_jax.sample import sample_from_workdir
  from ldm_jax.train import train_and_evaluate
  _, root, _, _, cache = sd3_setup
  config = _config(root, **{"data.latent_cache": cache})
  workdir = str(tmp_path / "run")
  state = train_and_evaluate(config, workdir)
  assert int(state.step) == 3
  assert set(state.params) == {"denoiser"}  # frozen encoders: nothing but the MM-DiT trains
  prompts = str(tmp_path / "prompts.txt")
  write_prompts_file(prompts, ["a red circle", "a blue square left of a green triangle"])
  out = sample_from_workdir(_config(root, **{"data.latent_cache": cache,
                                             "sample.prompts": prompts}), workdir)
  samples = np.load(os.path.join(out, "samples.npz"))
  assert samples["arr_0"].shape == (2, 16, 16, 3) and samples["arr_0"].dtype == np.uint8
  assert list(samples["prompts"]) == ["a red circle", "a blue square left of a green triangle"]
  # The trained MM-DiT, exported into the SD3 pipeline folder in place of its
  # transformer, generates the same images in diffusers and in our pipeline.
  import shutil
  from diffusers import StableDiffusion3Pipeline as TorchPipeline
  from ldm_jax.pipelines import StableDiffusion3Pipeline
  from ldm_jax.pipelines.export import export_text_to_image
  export_text_to_image(_config(root, **{"data.latent_cache": cache}), workdir,
                       str(tmp_path / "export"))
  folder = tmp_path / "pipeline"
  shutil.copytree(os.path.join(root, "pipeline"), folder)
  shutil.rmtree(folder / "transformer")
  shutil.copytree(tmp_path / "export" / "transformer", folder / "transformer")
  torch_pipe = TorchPipeline.from_pretrained(str(folder), local_files_only=True)
  torch_pipe.set_progress_bar_config(disable=True)
  noise = np.random.default_rng(5).standard_normal((1, 4, 8, 8)).astype(np.float32)
  kwargs = dict(prompt="a red circle", negative_prompt="", height=16, width=16,
                num_inference_steps=3, guidance_scale=2.0, max_sequence_length=T5_LENGTH)
  with torch.no_grad():
    theirs = torch_pipe(latents=torch.from_numpy(noise), output_type="np", **kwargs).images
  ours = StableDiffusion3Pipeline.from_diffusers(str(folder))(latents=noise, **kwargs)
  assert np.abs(ours - theirs).max() <= 1 / 255
  # Another text stack than the cache's is refused (its fingerprint): here CLIP-G's
  # tokenizer swapped for CLIP-L's, which differs only in its pad token.
  other = tmp_path / "other_pipeline"
  shutil.copytree(os.path.join(root, "pipeline"), other)
  shutil.rmtree(other / "tokenizer_2")
  shutil.copytree(other / "tokenizer", other / "tokenizer_2")
  with pytest.raises(UserError, match="not the ones that wrote the cache"):
    sample_from_workdir(_config(root, **{"data.latent_cache": cache, "sample.prompts": prompts,
                                         "data.text_pipeline": str(other)}), workdir)


def test_sd3_preset_requirements_fail_fast(tmp_path):
  from ldm_jax.first_stage import cache_latents
  from ldm_jax.training.setup import build_training
  config = load_config("configs/mmdit_256.py", "")
  with pytest.raises(UserError, match="data.latent_cache=DIR.*cache_latents.*:shapes"):
    build_training(config)
  with pytest.raises(UserError, match="data.folder.*cache.vae.*data.text_pipeline"):
    cache_latents(config, str(tmp_path / "w"), str(tmp_path / "cache"))
  assert not os.path.exists(tmp_path / "cache")
  config.data.latent_cache = str(tmp_path)  # not a cache
  with pytest.raises(UserError, match="not a latent cache"):
    build_training(config)


def test_sd3_medium_preset_shapes():
  """The default preset's abstract state and batch: SD3-medium + QK norm, FSDP rules,
  bf16 compute with float32 parameters, SD3-sized text parts in float16."""
  from ldm_jax.data.text import condition_struct
  from ldm_jax.models import build_model
  config = load_config("configs/mmdit_256.py", "")
  model = build_model(config.model, input_size=32, in_channels=16, num_classes=0)
  assert model.text_encoder is None and model.denoiser.qk_norm is True
  struct = condition_struct(config.data, 4)
  assert struct["t5"] == ((4, 77, 4096), np.float16)
  assert struct["clip_g"] == ((4, 77, 1280), np.float16)
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), np.zeros((1, 32, 32, 16), np.float32), np.zeros((1,), np.float32),
      {k: np.zeros(s[1:], d)[None] for k, (s, d) in condition_struct(config.data, 1).items()}))
  count = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))
  # sd3-medium's 2,028,328,000 + q/k RMSNorm scales: 24 blocks x 2 streams x 2 x 64.
  assert count == 2_028_328_000 + 24 * 2 * 2 * 64
  saved = json.dumps(config.to_dict(), default=str)
  assert '"text_encoder_dropout": 0.464' in saved
