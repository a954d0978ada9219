"""Autoencoders: parity of ldm_jax's AutoencoderKL / VQModel with tiny random diffusers
models, the export round trip, golden parameter counts of every variant, and the
errors a user can cause."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from ldm_jax.convert import common, vae as cvae  # noqa: E402
from ldm_jax.errors import UserError  # noqa: E402
from ldm_jax.models import vae  # noqa: E402
from ldm_jax.models.registry import count_params  # noqa: E402

TOL = 1e-5  # max |ours - ref| / max |ref|, float32
# Parameter counts (diffusers' and ours agree; checked below on the meta device).
GOLDEN_PARAMS = {"sd": 83_653_863, "sdxl": 83_653_863, "sd3": 83_819_683,
                 "kl-f4": 55_312_063, "vq-f4": 55_322_782, "vq-f8": 67_717_295,
                 "tiny-kl": 167_959, "tiny-vq": 179_214,
                 "mnist-kl-f4": 954_567, "mnist-vq-f4": 956_303, "shapes-kl-f4": 681_911}
SD_LIKE = dict(block_out_channels=(16, 32, 32), layers_per_block=2, norm_num_groups=8,
               latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 3,
               up_block_types=("UpDecoderBlock2D",) * 3)
SD3_LIKE = dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                latent_channels=16, down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, use_quant_conv=False,
                use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609)
VQ_LIKE = dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
               latent_channels=3, vq_embed_dim=4, num_vq_embeddings=32,
               down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
               up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"))


def _rel(a, b):
  a, b = np.asarray(a), np.asarray(b)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


def _images(seed=0, size=16, batch=2):
  return np.random.default_rng(seed).uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)


def _perturb_norms(model):
  """GroupNorm weights / all biases away from 1 / 0 so the mapping of each is tested."""
  with torch.no_grad():
    for name, q in model.named_parameters():
      if q.ndim == 1:
        q.add_(0.1 * torch.randn_like(q))


def _config(model):
  """A diffusers model's config as its config.json holds it (with `_class_name`)."""
  return dict(model.config, _class_name=type(model).__name__)


def _random_kl(cfg, seed):
  torch.manual_seed(seed)
  model = diffusers.AutoencoderKL(**cfg)
  _perturb_norms(model)
  return model.eval()


def _random_vq(seed, x):
  """A tiny VQModel whose codebook is made of (noisy) encoder outputs, so the codes
  used are many and distinct (the default uniform(-1/K, 1/K) codebook maps all to one)."""
  torch.manual_seed(seed)
  model = diffusers.VQModel(**VQ_LIKE)
  _perturb_norms(model)
  with torch.no_grad():
    h = model.encode(_nchw(x)).latents.permute(0, 2, 3, 1).reshape(-1, 4)
    pick = torch.randperm(h.shape[0])[:VQ_LIKE["num_vq_embeddings"]]
    model.quantize.embedding.weight.copy_(h[pick] + 0.05 * h.std() * torch.randn(len(pick), 4))
  return model.eval()


@functools.lru_cache(maxsize=None)
def _jitted(config_items, method):
  model = vae.make(dict(config_items))
  return jax.jit(functools.partial(model.apply, method=method))


def _ours(params, config, method, *args):
  key = tuple((k, tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in config.items())
  return _jitted(key, method)({"params": params}, *args)


@pytest.mark.parametrize("name, cfg", [("sd-like", SD_LIKE), ("sd3-like", SD3_LIKE)])
def test_autoencoder_kl_matches_diffusers(name, cfg):
  ref = _random_kl(cfg, seed=0)
  params, config = cvae.from_diffusers_state_dict(ref.state_dict(), _config(ref))
  assert config["use_quant_conv"] == (name == "sd-like")
  x = _images()
  with torch.no_grad():
    dist = ref.encode(_nchw(x)).latent_dist
    side = 16 // 2 ** (len(cfg["block_out_channels"]) - 1)
    z = np.random.default_rng(1).standard_normal((2, side, side, cfg["latent_channels"]))
    z = z.astype(np.float32)
    ref_decoded = _nhwc(ref.decode(_nchw(z)).sample)
    ref_forward = _nhwc(ref(_nchw(x), sample_posterior=False).sample)
    ref_kl = dist.kl().numpy()
  posterior = _ours(params, config, "encode", x)
  errors = dict(mean=_rel(posterior.mean, _nhwc(dist.mean)),
                logvar=_rel(posterior.logvar, _nhwc(dist.logvar)),
                kl=_rel(posterior.kl(), ref_kl),
                decode=_rel(_ours(params, config, "decode", z), ref_decoded),
                forward=_rel(_ours(params, config, "__call__", x)[0], ref_forward))
  print(f"{name}: " + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
  assert max(errors.values()) <= TOL, errors


def test_vq_model_matches_diffusers():
  x = _images(2)
  ref = _random_vq(0, x)
  params, config = cvae.from_diffusers_state_dict(ref.state_dict(), _config(ref))
  assert config["attention_levels"] == (1,) and config["embed_dim"] == 4
  with torch.no_grad():
    h = ref.encode(_nchw(x)).latents
    quant, loss, (_, _, ref_indices) = ref.quantize(h)
    ref_decoded = _nhwc(ref.decode(h).sample)
    ref_forward = _nhwc(ref(_nchw(x)).sample)
  ours_h = _ours(params, config, "encode", x)
  vq = _ours(params, config, "__call__", x)[1]
  indices = np.asarray(vq.indices)
  np.testing.assert_array_equal(indices.reshape(-1), ref_indices.numpy().reshape(-1))
  counts = np.bincount(indices.reshape(-1), minlength=32) / indices.size
  assert float(vq.usage) == np.mean(counts > 0) > 0.3
  np.testing.assert_allclose(float(vq.perplexity),
                             np.exp(-np.sum(counts[counts > 0] * np.log(counts[counts > 0]))),
                             rtol=1e-5)
  errors = dict(latents=_rel(ours_h, _nhwc(h)), quantized=_rel(vq.quantized, _nhwc(quant)),
                loss=_rel(vq.loss, loss.numpy()),
                decode=_rel(_ours(params, config, "decode", np.asarray(ours_h)), ref_decoded),
                forward=_rel(_ours(params, config, "__call__", x)[0], ref_forward),
                indices_decode=_rel(_ours(params, config, "decode_indices", indices), ref_decoded))
  print("vq: " + ", ".join(f"{k} {v:.2e}" for k, v in errors.items())
        + f"; usage {float(vq.usage):.2f}, perplexity {float(vq.perplexity):.1f}")
  assert max(errors.values()) <= TOL, errors


def _random_ours(config, seed):
  """Random ldm_jax params: init, then every leaf perturbed (norms and biases too)."""
  model = vae.make(config)
  x = jnp.zeros((1, model.downsampling_factor, model.downsampling_factor, 3))
  params = nn.unbox(jax.jit(model.init)(jax.random.key(seed), x)["params"])
  params = jax.tree.map(np.asarray, params)
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: (p + 0.1 * rng.standard_normal(p.shape) * (p.std() + 0.1)
                                 ).astype(np.float32), params)


@pytest.mark.parametrize("name", ["sd-like", "sd3-like", "vq"])
def test_export_round_trip(tmp_path, name):
  cfg = {"sd-like": SD_LIKE, "sd3-like": SD3_LIKE, "vq": VQ_LIKE}[name]
  is_vq = name == "vq"
  dcls = diffusers.VQModel if is_vq else diffusers.AutoencoderKL
  config = cvae.diffusers_to_config(dict(cfg, _class_name=dcls.__name__))
  params = _random_ours(config, seed=3)
  state, dcfg = cvae.to_diffusers(params, config, folder=str(tmp_path) if is_vq else None)
  fresh = dcls(**{k: v for k, v in dcfg.items() if k != "_class_name"})
  fresh.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
  fresh.eval()
  x = _images(4)
  with torch.no_grad():
    ref = _nhwc(fresh(_nchw(x)).sample)
  err = _rel(_ours(params, config, "__call__", x)[0], ref)
  print(f"{name}: ours -> diffusers forward rel err {err:.2e}")
  assert err <= TOL
  if is_vq:  # the written folder loads in diffusers and back in ldm_jax, unchanged
    loaded = diffusers.VQModel.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
      np.testing.assert_array_equal(_nhwc(loaded(_nchw(x)).sample), ref)
    back, config_back = cvae.from_diffusers(str(tmp_path))
  else:
    back, config_back = cvae.from_diffusers_state_dict(state, dcfg)
  assert config_back == config
  jax.tree.map(np.testing.assert_array_equal, back, params)


def _diffusers_meta_count(name):
  cfg = cvae.config_to_diffusers(vae.VARIANTS[name])
  cls = getattr(diffusers, cfg.pop("_class_name"))
  with torch.device("meta"):
    model = cls(**cfg)
  return sum(q.numel() for q in model.parameters())


@pytest.mark.parametrize("name", sorted(vae.VARIANTS))
def test_golden_param_counts(name):
  ours = count_params(cvae.expected_params(vae.VARIANTS[name]))
  assert ours == GOLDEN_PARAMS[name]
  if name in ("sd", "sd3", "vq-f8", "tiny-kl", "tiny-vq", "mnist-kl-f4", "mnist-vq-f4",
              "shapes-kl-f4"):
    # (sdxl, kl-f4, vq-f4: the same code paths as sd / vq-f8)
    assert ours == _diffusers_meta_count(name)  # built on torch's meta device, no weights


def test_every_variant_has_a_golden_count():
  assert set(vae.VARIANTS) == set(GOLDEN_PARAMS)


@pytest.mark.parametrize("name", ["tiny-kl", "tiny-vq"])
def test_every_parameter_has_logical_axes(name):
  boxed = cvae.expected_params(vae.VARIANTS[name])
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
  assert boxed["encoder"]["conv_in"]["kernel"].names == (None, None, "conv_in", "conv_out")
  if name == "tiny-vq":
    assert boxed["quantize"]["embedding"].names == ("codebook", None)


def test_build_and_latent_scaling():
  config = ml_collections.ConfigDict(dict(name="vae", variant="sd3", dtype="float32"))
  model = vae.build(config)
  assert isinstance(model, vae.AutoencoderKL) and model.latent_channels == 16
  assert not model.use_quant_conv and model.downsampling_factor == 8
  z = np.linspace(-2, 2, 16, dtype=np.float32)
  np.testing.assert_allclose(model.to_latent(z), (z - 0.0609) * 1.5305, rtol=1e-6)
  np.testing.assert_allclose(model.from_latent(model.to_latent(z)), z, rtol=1e-5, atol=1e-6)
  assert vae.build(ml_collections.ConfigDict(dict(name="vae", variant="sd"))).scaling_factor \
      == 0.18215
  assert isinstance(vae.build(ml_collections.ConfigDict(dict(name="vae", variant="vq-f4"))),
                    vae.VQModel)
  with pytest.raises(UserError, match=r"unknown vae variant 'sd4'; valid: \['kl-f4'"):
    vae.build(ml_collections.ConfigDict(dict(name="vae", variant="sd4")))


def test_posterior_sample_statistics():
  mean = np.full((1, 64, 64, 4), 0.5, np.float32)
  post = vae.DiagonalGaussian.from_moments(
      np.concatenate([mean, np.full_like(mean, np.log(4.0))], -1))
  sample = np.asarray(post.sample(jax.random.key(0)))
  assert abs(sample.mean() - 0.5) < 0.05 and abs(sample.std() - 2.0) < 0.05
  clipped = vae.DiagonalGaussian.from_moments(np.concatenate([mean, np.full_like(mean, 99.)], -1))
  assert float(clipped.logvar.max()) == 20.0


def test_bad_inputs(tmp_path):
  config = dict(vae.VARIANTS["tiny-kl"])
  params = _random_ours(config, 0)
  with pytest.raises(UserError, match="image size 18x17 is not a multiple of the "
                                      "downsampling factor 2"):
    _ours(params, config, "encode", np.zeros((1, 18, 17, 3), np.float32))
  with pytest.raises(UserError, match=r"latents of shape \(1, 4, 4, 16\), expected "
                                      r"\(B, h, w, 4\)"):
    _ours(params, config, "decode", np.zeros((1, 4, 4, 16), np.float32))
  # The wrong kind of folder: a DiT transformer's.
  common.write_json(dict(_class_name="DiTTransformer2DModel", num_layers=2), str(tmp_path /
                                                                                  "config.json"))
  with pytest.raises(UserError, match="_class_name 'DiTTransformer2DModel'; valid: "
                                      r"\['AutoencoderKL', 'VQModel'\]"):
    cvae.from_diffusers(str(tmp_path))
  # Strict coverage: a missing and a stray tensor, both named.
  state, dcfg = cvae.to_diffusers(params, config)
  state.pop("decoder.mid_block.attentions.0.to_out.0.bias")
  state["encoder.extra.weight"] = np.zeros(3, np.float32)
  with pytest.raises(UserError, match=r"(?s)missing: decoder\.mid_block\.attentions\.0\.to_out"
                                      r"\.0\.bias.*unused: encoder\.extra\.weight"):
    cvae.from_diffusers_state_dict(state, dcfg)
  # Per-channel latent statistics are a pipeline's business (diffusers' SD3 pipeline
  # ignores them too): the config converts, the same as without them.
  assert cvae.diffusers_to_config(dict(dcfg, latents_std=[1.0] * 4)) == \
      cvae.diffusers_to_config(dcfg)
