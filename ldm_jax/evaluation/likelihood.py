"""`--mode=bpd`: the variational bound on the negative log-likelihood of held-out data,
in bits per dimension (improved DDPM §3, Table 2), for a run with a gaussian process.

  python -m ldm_jax.main --config=configs/quickstart.py:dit_sigma --workdir=runs/dit_sigma \
      --mode=bpd

The bound is evaluated with the (EMA, per `sample.use_ema`) parameters on the first
`eval.bpd_num` images of the data split `eval.bpd_split`, class-conditioned on their true
labels when the model is conditional (so it bounds -log p(x | y)). `eval.bpd_num_terms`
= 0 evaluates all T terms (T model calls per image: the exact bound); k > 0 uses k terms
(`GaussianDiffusion.bits_per_dim`). Results go to a new `likelihood/bpd-<step>[-n]`
directory as `bpd.json`; nothing is overwritten.
"""

import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.diffusion.gaussian import GaussianDiffusion
from ldm_jax.errors import check
from ldm_jax.training.step import to_model_range

logger = logging.getLogger("ldm_jax")


def make_bpd_fn(model, process: GaussianDiffusion, num_terms: int | None):
  """A jitted `(params, images uint8 (B, H, W, C), labels (B,), key) -> bits/dim (B,)`."""

  @jax.jit
  def bpd_fn(params, images, labels, key):
    def model_fn(x_t, model_time):
      return model.apply({"params": params}, x_t, model_time, labels)
    total, terms = process.bits_per_dim(model_fn, to_model_range(images), key,
                                        num_terms=num_terms)
    return total, terms["vlb_t"][0], terms["prior"]

  bpd_fn.num_terms = len(process.bits_per_dim_times(num_terms)[0])
  return bpd_fn


def evaluate_bpd(bpd_fn, params, images: np.ndarray, labels: np.ndarray, batch_size: int,
                 key) -> dict:
  """Runs `bpd_fn` over the images in fixed-size batches (the last one padded)."""
  totals, decoder, prior = [], [], []
  num = len(images)
  batches = -(-num // batch_size)
  for b in range(batches):
    idx = np.resize(np.arange(b * batch_size, min((b + 1) * batch_size, num)), batch_size)
    total, nll0, kl_prior = bpd_fn(params, jnp.asarray(images[idx]), jnp.asarray(labels[idx]),
                                   jax.random.fold_in(key, b))
    keep = min(batch_size, num - b * batch_size)
    totals.append(np.asarray(total)[:keep])
    decoder.append(np.asarray(nll0)[:keep])
    prior.append(np.asarray(kl_prior)[:keep])
    logger.info("bits/dim: batch %d/%d, running mean %.4f", b + 1, batches,
                float(np.concatenate(totals).mean()))
  totals = np.concatenate(totals)
  return {"bits_per_dim": float(totals.mean()),
          "standard_error": float(totals.std(ddof=1) / np.sqrt(len(totals))) if num > 1 else 0.0,
          "decoder_nll_bits_per_dim": float(np.concatenate(decoder).mean()),
          "prior_bits_per_dim": float(np.concatenate(prior).mean()),
          "num_images": int(num)}


def write_report(out_dir: str, report: dict) -> str:
  os.makedirs(out_dir)
  path = os.path.join(out_dir, "bpd.json")
  with open(path, "w") as f:
    json.dump(report, f, indent=2, sort_keys=True)
  return path


def check_bpd_config(process, eval_config):
  check(isinstance(process, GaussianDiffusion),
        "--mode=bpd evaluates the variational bound of a gaussian process "
        "(diffusion.process='gaussian'); rectified flow has no such discrete-time bound")
  check(not (process.zero_terminal_snr and process.prediction == "epsilon"),
        "--mode=bpd: an ε-prediction process with zero terminal SNR has no finite bound "
        "(x0 from ε divides by sqrt(ᾱ_T) = 0)")
  check(int(eval_config.get("bpd_num", 500)) >= 1,
        f"eval.bpd_num must be >= 1, got {eval_config.get('bpd_num')}")
  check(int(eval_config.get("bpd_batch_size", 100)) >= 1,
        f"eval.bpd_batch_size must be >= 1, got {eval_config.get('bpd_batch_size')}")
  terms = int(eval_config.get("bpd_num_terms", 0))
  check(terms == 0 or terms >= 2,
        f"eval.bpd_num_terms must be 0 (all T terms) or >= 2, got {terms}")
  return terms or None


def bpd_from_workdir(config, workdir: str) -> str:
  """`--mode=bpd`: restores `workdir`'s latest checkpoint and writes the bound on
  held-out data to a new directory; returns the path of its `bpd.json`."""
  from ldm_jax.data.pipeline import make_source
  from ldm_jax.models.registry import model_labels
  from ldm_jax.sample import restore_for_inference, unique_dir
  check(config.data.source != "latents",
        "--mode=bpd bounds the likelihood of images under a pixel-space denoiser; this run "
        "trains on a latent cache (data.source='latents'), whose bound would be in latent "
        "units, not bits per image dimension")

  eval_config = config.eval
  split = eval_config.get("bpd_split", "heldout")
  model, process, mesh, params, step = restore_for_inference(config, workdir, "bpd")
  num_terms = check_bpd_config(process, eval_config)
  source = make_source(config.data, split)
  num = min(int(eval_config.get("bpd_num", 500)), len(source))
  records = [source[i] for i in range(num)]
  images = np.stack([r["image"] for r in records])
  labels = np.asarray([r["label"] for r in records], np.int32)
  with jax.set_mesh(mesh):
    bpd_fn = make_bpd_fn(model, process, num_terms)
    used_terms = bpd_fn.num_terms

    def conditioned(params, images, labels, key):
      return bpd_fn(params, images, model_labels(model, labels), key)

    report = evaluate_bpd(conditioned, params, images, labels,
                          int(eval_config.get("bpd_batch_size", 100)),
                          jax.random.key(config.sample.seed))
  report.update(step=int(step), split=split, num_terms=used_terms, use_ema=bool(config.sample.use_ema),
                variance_type=process.variance_type)
  out_dir = unique_dir(os.path.join(os.path.abspath(workdir), "likelihood", f"bpd-{step}"))
  path = write_report(out_dir, report)
  logger.info("bits/dim %.4f ± %.4f on %d %s images -> %s", report["bits_per_dim"],
              report["standard_error"], num, split, path)
  return path
