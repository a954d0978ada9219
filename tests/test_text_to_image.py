"""Text-to-image training: TextToImage, condition dropout, guidance on text conditions,
and configs/mmdit_256.py's tiny chain trained and sampled end to end."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.data.text import null_condition, prompt_condition
from ldm_jax.diffusion.guidance import guided_model_fn
from ldm_jax.errors import UserError
from ldm_jax.models import build_model
from ldm_jax.training.step import drop_condition
from tests.helpers import load_config

PROMPTS = ["a red circle", "a blue square left of a green triangle", "a yellow square"]


def _tiny(**overrides):
  return load_config("configs/mmdit_256.py", "tiny", **overrides)


def test_text_to_image_tokens_equal_explicit_embeddings():
  """The model's own encoder path equals calling the MM-DiT with encode_text's output."""
  config = _tiny()
  model = build_model(config.model, input_size=32, in_channels=3, num_classes=0)
  cond = {k: jnp.asarray(v) for k, v in prompt_condition(config.data, PROMPTS).items()}
  x = jax.random.normal(jax.random.key(0), (3, 32, 32, 3))
  t = jnp.array([10.0, 500.0, 990.0])
  params = model.init(jax.random.key(1), x, t, cond)["params"]
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(2), p.shape),
                        params)  # non-zero adaLN / final layers
  out = model.apply({"params": params}, x, t, cond)
  context, pooled = model.apply({"params": params}, cond["tokens"], method="encode_text")
  direct = model.apply({"params": params}, x, t, {"context": context, "pooled": pooled})
  np.testing.assert_allclose(out, direct, rtol=1e-5, atol=1e-5)
  # The prompt matters: another prompt gives another output.
  other = {"tokens": jnp.roll(cond["tokens"], 1, axis=0)}
  assert float(jnp.abs(model.apply({"params": params}, x, t, other) - out).max()) > 1e-3
  # Padding is masked: dropping the trailing pad columns (the longest prompt has 10
  # tokens) leaves the pooled vector unchanged.
  _, pooled_short = model.apply({"params": params}, cond["tokens"][:, :10], method="encode_text")
  np.testing.assert_allclose(pooled_short, pooled, rtol=1e-5, atol=1e-6)
  assert set(params) == {"denoiser", "text_encoder"}


def test_drop_condition_swaps_whole_examples():
  config = _tiny()
  cond = {k: jnp.asarray(v) for k, v in prompt_condition(config.data, PROMPTS * 200).items()}
  null = {k: jnp.asarray(v) for k, v in null_condition(config.data).items()}
  assert np.array_equal(drop_condition(cond, null, 0.0, jax.random.key(0))["tokens"],
                        cond["tokens"])
  everything = drop_condition(cond, null, 1.0, jax.random.key(0))["tokens"]
  assert np.array_equal(everything, np.broadcast_to(null["tokens"], cond["tokens"].shape))
  some = np.asarray(drop_condition(cond, null, 0.3, jax.random.key(0))["tokens"])
  dropped = np.all(some == np.asarray(null["tokens"]), axis=1)
  kept = np.all(some == np.asarray(cond["tokens"]), axis=1)
  assert np.all(dropped | kept)  # whole rows, never a mix
  assert 0.25 < dropped.mean() < 0.35, dropped.mean()
  # The null condition is the empty prompt's: bos, eos, then padding.
  assert list(np.asarray(null["tokens"])[:3]) == [1, 2, 0]


def test_guidance_on_text_conditions():
  """guided_model_fn with a dict condition: u + s (c - u), u from the null condition."""
  cond = {"tokens": jnp.array([[1, 5, 2], [1, 6, 2]])}
  null = {"tokens": jnp.array([1, 2, 0])}

  def apply_fn(x, t, c):
    return x * jnp.sum(c["tokens"], axis=1)[:, None, None, None].astype(x.dtype) + t[:, None,
                                                                                      None, None]

  x = jnp.ones((2, 2, 2, 1))
  t = jnp.array([3.0, 4.0])
  out = guided_model_fn(apply_fn, cond, null, 2.5, guided_channels=1)(x, t)
  c = apply_fn(x, t, cond)
  u = apply_fn(x, t, {"tokens": jnp.broadcast_to(null["tokens"], (2, 3))})
  np.testing.assert_allclose(out, u + 2.5 * (c - u), rtol=1e-6)


def test_tiny_chain_trains_and_samples_prompts(tmp_path):
  from ldm_jax.sample import sample_from_workdir
  from ldm_jax.train import train_and_evaluate
  from ldm_jax.data.shapes import write_prompts_file
  workdir = str(tmp_path / "run")
  state = train_and_evaluate(_tiny(), workdir)
  assert int(state.step) == 4
  assert os.path.exists(os.path.join(workdir, "grids", "step_0000004.png"))
  prompts = tmp_path / "prompts.txt"
  write_prompts_file(str(prompts), ["a green circle", "a red square above a blue triangle",
                                    "a yellow triangle"])
  out = sample_from_workdir(_tiny(**{"sample.prompts": str(prompts)}), workdir)
  samples = np.load(os.path.join(out, "samples.npz"))
  assert samples["arr_0"].shape == (3, 32, 32, 3) and samples["arr_0"].dtype == np.uint8
  assert list(samples["prompts"]) == ["a green circle", "a red square above a blue triangle",
                                      "a yellow triangle"]
  with open(os.path.join(out, "judge.json")) as f:
    report = json.load(f)
  assert report["summary"]["n"] == 3 and len(report["samples"]) == 3
  _check_export(workdir, tmp_path / "export")


def test_latent_chain_from_one_config(tmp_path):
  """configs/mmdit_256.py:tiny_chain (the shapes preset's LDM chain, tiny): one config
  trains its autoencoder, caches the captioned latents and trains the MM-DiT on them;
  sampling decodes with that autoencoder; a second run rebuilds nothing; an interrupted
  encoding is discarded; a foreign WORKDIR/latents is refused, not overwritten."""
  from ldm_jax import chain
  from ldm_jax.data.latents import MANIFEST, read_manifest
  from ldm_jax.sample import sample_from_workdir
  from ldm_jax.train import train_and_evaluate
  config = load_config("configs/mmdit_256.py", "tiny_chain")
  workdir = str(tmp_path / "run")
  vae_dir, cache_dir = chain.chain_dirs(workdir)
  with pytest.raises(UserError, match="run --mode=train first"):
    chain.resolve(config, workdir, "sample")
  os.makedirs(cache_dir + ".partial")  # what a process killed while encoding leaves
  with open(os.path.join(cache_dir + ".partial", "shard-junk"), "w") as f:
    f.write("x")
  resolved = chain.resolve(config, workdir, "train")
  assert resolved.data.latent_cache == cache_dir and config.data.latent_cache == ""
  assert not os.path.exists(cache_dir + ".partial")
  manifest = read_manifest(cache_dir)
  assert manifest["num_examples"] == 48 and manifest["captions"]
  assert manifest["num_classes"] == 0 and tuple(manifest["latent_shape"]) == (16, 16, 4)
  assert os.path.abspath(manifest["vae"]["path"]) == vae_dir
  stamp = os.path.getmtime(os.path.join(cache_dir, MANIFEST))
  state = train_and_evaluate(resolved, workdir)
  assert int(state.step) == 4
  again = chain.resolve(config, workdir, "train")  # complete: nothing retrained / re-encoded
  assert again.data.latent_cache == cache_dir
  assert os.path.getmtime(os.path.join(cache_dir, MANIFEST)) == stamp
  out = sample_from_workdir(chain.resolve(config, workdir, "sample"), workdir)
  samples = np.load(os.path.join(out, "samples.npz"))
  assert samples["arr_0"].shape == (4, 32, 32, 3)  # decoded by the tiny-kl autoencoder
  assert os.path.exists(os.path.join(out, "judge.json"))
  # --mode=export of the latent MM-DiT: also its autoencoder, with the cache's scale,
  # which diffusers loads and decodes as ours does.
  torch = pytest.importorskip("torch")
  from diffusers import AutoencoderKL
  from ldm_jax.first_stage import decoder_for
  from ldm_jax.pipelines.export import export_text_to_image
  export_text_to_image(chain.resolve(config, workdir, "export"), workdir, str(tmp_path / "x"))
  theirs = AutoencoderKL.from_pretrained(str(tmp_path / "x" / "vae")).eval()
  assert theirs.config.scaling_factor == pytest.approx(manifest["vae"]["scaling_factor"])
  assert theirs.config.sample_size == 32
  stage = decoder_for(chain.resolve(config, workdir, "sample"))
  z = np.random.default_rng(0).standard_normal((2, 16, 16, 4)).astype(np.float32)
  ours = np.asarray(stage.model.apply({"params": stage.params}, jnp.asarray(z),
                                      method=stage.model.decode))
  with torch.no_grad():
    ref = theirs.decode(torch.from_numpy(z.transpose(0, 3, 1, 2))).sample.numpy()
  np.testing.assert_allclose(ref.transpose(0, 2, 3, 1), ours, atol=1e-4 * np.abs(ref).max())
  # A first stage other than the one this workdir built is refused.
  changed = load_config("configs/mmdit_256.py", "tiny_chain",
                        **{"first_stage.cache.num_examples": 32})
  with pytest.raises(UserError, match="num_examples: config 32 vs cache 48"):
    chain.resolve(changed, workdir, "train")
  other = str(tmp_path / "other")
  os.makedirs(os.path.join(other, "latents"))
  with pytest.raises(UserError, match="holds no complete latent cache"):
    chain.resolve(config, other, "train")


def _check_export(workdir, out):
  """--mode=export: the MM-DiT loads in diffusers and computes what ours computes; the
  text encoder loads in transformers; nothing is overwritten."""
  torch = pytest.importorskip("torch")
  from diffusers import SD3Transformer2DModel
  from transformers import CLIPTextModel
  from ldm_jax.pipelines.export import export_text_to_image
  from ldm_jax.sample import restore_for_inference
  config = _tiny()
  export_text_to_image(config, workdir, str(out))
  with pytest.raises(UserError, match="exists; nothing was overwritten"):
    export_text_to_image(config, workdir, str(out))
  model, _, _, params, _ = restore_for_inference(config, workdir, "export")
  theirs = SD3Transformer2DModel.from_pretrained(str(out / "transformer")).eval()
  encoder = CLIPTextModel.from_pretrained(str(out / "text_encoder")).eval()
  assert (out / "word_tokenizer.json").exists()
  cond = prompt_condition(config.data, PROMPTS)
  x = np.random.default_rng(0).standard_normal((3, 32, 32, 3)).astype(np.float32)
  t = np.array([100.0, 400.0, 900.0], np.float32)
  ours = np.asarray(model.apply({"params": params}, x, t,
                                {k: jnp.asarray(v) for k, v in cond.items()}))
  context, pooled = model.apply({"params": params}, jnp.asarray(cond["tokens"]),
                                method="encode_text")
  with torch.no_grad():
    hidden = encoder(torch.from_numpy(cond["tokens"]).long(),
                     attention_mask=torch.from_numpy((cond["tokens"] != 0).astype(np.int64))
                     ).last_hidden_state.numpy()
    ref = theirs(hidden_states=torch.from_numpy(x.transpose(0, 3, 1, 2)),
                 timestep=torch.from_numpy(t), encoder_hidden_states=torch.from_numpy(hidden),
                 pooled_projections=torch.from_numpy(np.array(pooled))).sample.numpy()
  np.testing.assert_allclose(hidden, np.asarray(context), atol=1e-4)
  np.testing.assert_allclose(ref.transpose(0, 2, 3, 1), ours, atol=1e-4 * np.abs(ref).max())


def test_config_errors():
  from ldm_jax.run_config import validate
  with pytest.raises(UserError, match="configs/mmdit_256.py:shapes"):
    validate(load_config("configs/mmdit_256.py"))  # the SD3 preset without its cache
  with pytest.raises(UserError, match="needs model.name='mmdit'"):
    validate(load_config("configs/quickstart.py", "tiny", **{"data.tokenizer": "shapes-words",
                                                             "data.num_classes": 0}))
  with pytest.raises(UserError, match="set data.tokenizer"):
    validate(_tiny(**{"data.tokenizer": ""}))
  with pytest.raises(UserError, match="text_dropout > 0"):
    validate(_tiny(**{"model.text_dropout": 0.0, "sample.guidance_scale": 2.0}))
