"""A cache of autoencoder latents: encode the dataset once, train the denoiser on it.

A latent diffusion model is trained on latents of a frozen autoencoder; encoding
every image in every step repeats the same (expensive) VAE forward. A latent cache
stores the encoding once, and `data.source = "latents"` with `data.latent_cache = DIR`
trains from it.

Layout of a cache directory:

  manifest.json                              written last: its presence = complete
  null_text.msgpack                          text caches: the empty prompt's embeddings
  shard-P00000-of-00002-S00000.array_record  one ArrayRecord file per <= shard_size
  shard-P00000-of-00002-S00001.array_record  records, named by writing process P
  shard-P00001-of-00002-S00000.array_record  and shard S

Each record is one example, `flax.serialization.msgpack_serialize` of a dict (never
pickle):
  store="mean_std": {"mean": (h, w, c), "std": (h, w, c), "label": int}
  store="mean":     {"mean": (h, w, c), "label": int}
  store="sample":   {"latent": (h, w, c), "label": int}  (one draw, fixed forever)
plus "caption": str when the batches carry captions, and, for a text-to-image cache
(`text_fn`), the caption's text embeddings by part name (e.g. SD3's clip_l, clip_g,
t5, pooled_l, pooled_g; see ldm_jax/pipelines/sd3_text.py), stored in the same float
dtype. Label-free sources (num_classes 0) store no "label". Arrays are stored as float32 or
float16 and are already in the denoiser's latent space, i.e. mapped by the VAE's
latent normalisation: mean' = (mean - shift_factor) * scaling_factor,
std' = std * scaling_factor (the caller's `encode_fn` applies it).

The example order of a cache is process 0's shards, then process 1's, ..., each in
the order its batches came; with `source_batches` (contiguous per-process ranges)
cache index i is source index i.

Multi-process protocol (deterministic names + per-process part files):
  1. Every process p calls `write_cache(..., process_index=p, process_count=P)` on
     its own batches. It writes its shards (temporary names, renamed when complete)
     and then, last, `part-<p>-of-<P>.json` listing its shards and counts.
  2. The caller runs a barrier (e.g. `jax.experimental.multihost_utils.
     sync_global_devices`), so every process's part file exists.
  3. Process 0 calls `finalize_cache(out_dir, process_count=P)`: it checks every
     part (all present, same store/dtype/shape/VAE/fingerprint/source), writes
     `manifest.json` (temp name + rename) and removes the part files.
  With one process, `write_cache` finalises by itself.

A directory without `manifest.json` is an incomplete cache: readers refuse it.
"""

import datetime
import hashlib
import json
import os
import re
from typing import Any, Callable, Iterable, Iterator, Mapping

import grain
import numpy as np
from array_record.python import array_record_module
from flax import serialization

from ldm_jax.convert.common import flatten_params
from ldm_jax.errors import UserError, check

FORMAT = "ldm_jax.latent_cache"
VERSION = 1
MANIFEST = "manifest.json"
NULL_TEXT = "null_text.msgpack"
STORES = ("mean_std", "mean", "sample")
DTYPES = ("float32", "float16")
DEFAULT_SHARD_SIZE = 4096
# group_size:1 makes every record individually addressable (Grain's random access).
_WRITER_OPTIONS = "group_size:1"
_SHARD_RE = re.compile(r"shard-P(\d{5})-of-(\d{5})-S(\d{5})\.array_record(\.tmp)?")
_PART_RE = re.compile(r"part-(\d{5})-of-(\d{5})\.json(\.tmp)?")
# The arrays each store kind keeps, by record key; the first is the latent itself.
_STORE_KEYS = {"mean_std": ("mean", "std"), "mean": ("mean",), "sample": ("latent",)}


def shard_name(process_index: int, process_count: int, shard_index: int) -> str:
  """File name of shard `shard_index` written by process `process_index`."""
  return f"shard-P{process_index:05d}-of-{process_count:05d}-S{shard_index:05d}.array_record"


def part_name(process_index: int, process_count: int) -> str:
  """File name of the per-process part list (see the module docstring)."""
  return f"part-{process_index:05d}-of-{process_count:05d}.json"


# ---------------------------------------------------------------- fingerprint


def vae_fingerprint(params, vae_config: Mapping[str, Any]) -> str:
  """sha256 (hex) of an autoencoder: its config and every weight.

  Hashes the canonical JSON of `vae_config` (sorted keys; non-JSON values by `str`),
  then, for every parameter sorted by '/'-joined path: the path, shape, dtype and raw
  bytes. Equal weights give equal fingerprints; changing any element changes it.

  Args:
    params: the (possibly boxed, possibly `{"params": ...}`-wrapped) params tree;
      arrays must be fully addressable from this process.
    vae_config: the autoencoder's config as a dict (e.g. `kind` plus fields).

  Returns:
    64 hex digits.
  """
  digest = hashlib.sha256()
  digest.update(json.dumps(dict(vae_config), sort_keys=True, separators=(",", ":"),
                           default=str).encode())
  flat = flatten_params(params)
  for path in sorted(flat):
    array = np.ascontiguousarray(flat[path])
    header = json.dumps([path, list(array.shape), str(array.dtype)], separators=(",", ":"))
    digest.update(b"\0" + header.encode() + b"\0")
    digest.update(memoryview(array.reshape(-1).view(np.uint8)))
  return digest.hexdigest()


# ---------------------------------------------------------------- writing


def source_batches(source, batch_size: int, *, process_index: int = 0,
                   process_count: int = 1) -> Iterator[dict]:
  """This process's share of a random-access image source, in order, for `write_cache`.

  Process p of P takes the contiguous index range [p*N//P, (p+1)*N//P) and yields it
  in batches {"image": uint8 (b, H, W, C), "label": int32 (b,)} of `batch_size` (no
  "label" for a label-free source, e.g. image-caption pairs)
  (the last one may be shorter: an `encode_fn` sharded over devices pads it itself).
  Concatenated in process order the shares are the whole source, so cache index i is
  source index i.
  """
  check(batch_size > 0, f"batch_size must be positive, got {batch_size}")
  n = len(source)
  start, stop = process_index * n // process_count, (process_index + 1) * n // process_count
  for first in range(start, stop, batch_size):
    records = [source[i] for i in range(first, min(first + batch_size, stop))]
    batch = {"image": np.stack([np.asarray(r["image"]) for r in records])}
    if "label" in records[0]:
      batch["label"] = np.asarray([r["label"] for r in records], np.int32)
    if "caption" in records[0]:
      batch["caption"] = [str(r["caption"]) for r in records]
    yield batch


def _check_writable(out_dir: str, process_index: int, process_count: int) -> None:
  """Refuses a complete cache, foreign files and this process's own leftovers; files
  of the other processes of the same job (same process count) are expected."""
  if not os.path.exists(out_dir):
    return
  check(os.path.isdir(out_dir), f"latent cache path {out_dir!r} exists and is not a directory")
  names = sorted(os.listdir(out_dir))
  if MANIFEST in names:
    raise UserError(f"{out_dir!r} already holds a latent cache ({MANIFEST}); refusing to "
                    "overwrite it: choose a new directory or delete this one")
  foreign, own = [], []
  for name in names:
    m = _SHARD_RE.fullmatch(name) or _PART_RE.fullmatch(name)
    if name in (NULL_TEXT, NULL_TEXT + ".tmp") and process_index != 0:
      continue  # process 0's
    if not m or int(m.group(2)) != process_count:
      foreign.append(name)
    elif int(m.group(1)) == process_index:
      own.append(name)
  check(not foreign, f"latent cache directory {out_dir!r} is not empty (it has {foreign[:5]}"
        f"{' ...' if len(foreign) > 5 else ''}); write a cache into a new or empty directory")
  check(not own, f"latent cache directory {out_dir!r} has leftovers of an earlier, interrupted "
        f"write by process {process_index} ({own[:3]}); delete the directory and encode again")


class _ShardWriter:
  """Records into numbered shards of `shard_size`; each shard is written under a
  temporary name and renamed when closed."""

  def __init__(self, out_dir: str, process_index: int, process_count: int, shard_size: int):
    self.out_dir, self.process_index, self.process_count = out_dir, process_index, process_count
    self.shard_size = shard_size
    self.shards: list[dict] = []  # {"file", "count"} of closed shards
    self._writer, self._count = None, 0

  def write(self, record: bytes) -> None:
    if self._writer is None:
      name = shard_name(self.process_index, self.process_count, len(self.shards))
      self._writer = array_record_module.ArrayRecordWriter(
          os.path.join(self.out_dir, name + ".tmp"), _WRITER_OPTIONS)
      self._name, self._count = name, 0
    self._writer.write(record)
    self._count += 1
    if self._count == self.shard_size:
      self.close()

  def close(self, commit: bool = True) -> None:
    if self._writer is None:
      return
    ok = self._writer.ok()
    self._writer.close()
    self._writer = None
    path = os.path.join(self.out_dir, self._name)
    if not commit:
      return
    if not ok:
      raise OSError(f"writing latent cache shard {path} failed")
    os.replace(path + ".tmp", path)
    self.shards.append({"file": self._name, "count": self._count})


def _write_json(path: str, value: dict) -> None:
  """Atomically (temp file, fsync, rename) writes `value` as JSON."""
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(value, f, indent=2, sort_keys=True, default=str)  # str: e.g. dtypes
    f.write("\n")
    f.flush()
    os.fsync(f.fileno())
  os.replace(path + ".tmp", path)


def _text_arrays(text: Mapping[str, Any], n: int, dtype: str, what: str) -> dict:
  """text_fn's output as numpy arrays of the stored dtype, checked (batch n, finite)."""
  check(isinstance(text, Mapping) and text, f"text_fn must return a dict of arrays, got "
        f"{type(text).__name__}")
  out = {}
  for k, a in text.items():
    a = np.asarray(a)
    check(a.ndim >= 2 and a.shape[0] == n, f"text_fn returned {k!r} of shape {a.shape} for "
          f"{n} captions ({what})")
    with np.errstate(over="ignore"):
      a = a.astype(dtype)
    check(np.isfinite(a).all(), f"text_fn gave non-finite {k!r} (as {dtype}) for {what}")
    out[str(k)] = a
  return out


def _to_numpy(encoded: Mapping[str, Any], keys: tuple[str, ...], store: str) -> dict:
  missing = [k for k in keys if k not in encoded]
  check(not missing, f"store={store!r} needs encode_fn to return {list(keys)}; "
        f"it returned {sorted(encoded)}")
  return {k: np.asarray(encoded[k]) for k in keys}


def write_cache(out_dir: str, batches: Iterable[Mapping[str, Any]],
                encode_fn: Callable[[np.ndarray], Mapping[str, Any]], *, store: str,
                dtype: str = "float32", vae_info: Mapping[str, Any], fingerprint: str,
                source_info: Mapping[str, Any], num_classes: int,
                shard_size: int = DEFAULT_SHARD_SIZE, process_index: int = 0,
                process_count: int = 1,
                text_fn: Callable[[list], Mapping[str, Any]] | None = None,
                text_info: Mapping[str, Any] | None = None) -> dict:
  """Encodes this process's batches into shards of a latent cache.

  Args:
    out_dir: cache directory; must not exist or be empty (other processes of the same
      job may already have written their files into it).
    batches: this process's {"image": uint8 (B, H, W, C), "label": int (B,)} batches
      (optionally "caption": B strings), e.g. from `source_batches`.
    encode_fn: images uint8 (B, H, W, C) -> {"mean", "std"} (store "mean_std"),
      {"mean"} ("mean") or {"latent"} ("sample"), numpy or jax arrays (B, h, w, c)
      already mapped by the VAE's latent normalisation. It is called on the next batch
      before the previous result is fetched, so jitted work overlaps the writing.
    store: "mean_std", "mean" or "sample".
    dtype: stored float dtype, "float32" or "float16".
    vae_info: description of the VAE (name / variant / config / scaling_factor /
      shift_factor), copied into the manifest.
    fingerprint: `vae_fingerprint` of the VAE; `check_cache` compares it.
    source_info: description of the encoded data (source, split, image size, ...).
    num_classes: number of label classes; every label must lie in [0, num_classes).
      0: a label-free source (its batches carry no "label", but "caption").
    shard_size: records per shard file.
    process_index, process_count: this process and the number of writing processes.
    text_fn: for a text-to-image cache, captions (list of str) -> {part: (B, ...)
      array} of text embeddings, stored per example under the part names; process 0
      also stores text_fn([""]) (the empty prompt's, for condition dropout and
      classifier-free guidance) as NULL_TEXT. Needs "caption" in every batch.
    text_info: description of the text encoders (incl. their "fingerprint"), copied
      into the manifest; required with `text_fn`.

  Returns:
    The manifest when `process_count == 1` (the cache is complete); otherwise this
    process's part ({"shards": [...], "num_examples": ...}); then, after a barrier,
    process 0 calls `finalize_cache`.

  Raises:
    UserError: bad arguments, a non-empty `out_dir`, bad encoder outputs (wrong keys,
      shapes, non-finite values) or labels out of range.
  """
  check(store in STORES, f"latent cache store {store!r}; valid: {list(STORES)}")
  check(dtype in DTYPES, f"latent cache dtype {dtype!r}; valid: {list(DTYPES)}")
  check(shard_size > 0, f"shard_size must be positive, got {shard_size}")
  check(0 <= process_index < process_count,
        f"process_index={process_index} must be in [0, process_count={process_count})")
  check(isinstance(fingerprint, str) and fingerprint, "fingerprint must be a non-empty string")
  check(int(num_classes) >= 0, f"num_classes must be >= 0, got {num_classes} (0: a "
        "label-free, captioned cache)")
  check(text_fn is None or (text_info is not None and text_info.get("fingerprint")),
        "write_cache: text_fn needs text_info with the encoders' 'fingerprint'")
  _check_writable(out_dir, process_index, process_count)
  os.makedirs(out_dir, exist_ok=True)

  keys = _STORE_KEYS[store]
  writer = _ShardWriter(out_dir, process_index, process_count, shard_size)
  shape, captions, written = None, None, 0
  text_shapes = None
  if text_fn is not None and process_index == 0:
    null = _text_arrays(text_fn([""]), 1, dtype, "the empty prompt")
    text_shapes = {k: list(a.shape[1:]) for k, a in null.items()}
    with open(os.path.join(out_dir, NULL_TEXT + ".tmp"), "wb") as f:
      f.write(serialization.msgpack_serialize({k: a[0] for k, a in null.items()}))
      f.flush()
      os.fsync(f.fileno())
    os.replace(os.path.join(out_dir, NULL_TEXT + ".tmp"), os.path.join(out_dir, NULL_TEXT))

  def flush(batch, encoded, text):
    nonlocal shape, captions, written, text_shapes
    arrays = _to_numpy(encoded, keys, store)
    n = len(np.asarray(batch["image"]))
    for k, a in arrays.items():
      check(a.ndim == 4 and a.shape[0] == n,
            f"encode_fn returned {k!r} of shape {a.shape} for a batch of {n} images; "
            "expected (B, h, w, c) with B = the batch's image count")
    shape = shape or tuple(arrays[keys[0]].shape[1:])
    for k, a in arrays.items():
      check(a.shape[1:] == shape, f"encode_fn returned {k!r} of latent shape {a.shape[1:]}; "
            f"earlier batches had {shape}")
    if text is not None:
      text = _text_arrays(text, n, dtype, f"the batch starting at example {written}")
      got = {k: list(a.shape[1:]) for k, a in text.items()}
      text_shapes = text_shapes or got
      check(got == text_shapes, f"text_fn returned parts {got}; earlier {text_shapes}")
    if num_classes:  # a label-free (text) cache stores none
      labels = np.asarray(batch["label"])
      check(np.issubdtype(labels.dtype, np.integer) and labels.shape == (n,),
            f"batch labels must be integers of shape ({n},); got {labels.dtype} {labels.shape}")
      bad = labels[(labels < 0) | (labels >= num_classes)]
      check(bad.size == 0, f"label {bad[:1].tolist()} out of range [0, num_classes="
            f"{num_classes}) in the batch starting at example {written} of process "
            f"{process_index}")
    has_captions = "caption" in batch
    captions = has_captions if captions is None else captions
    check(captions == has_captions, "either every batch or no batch must carry 'caption'")
    with np.errstate(over="ignore"):  # reported below as non-finite
      stored = {k: a.astype(dtype) for k, a in arrays.items()}
    for k, a in stored.items():
      finite = np.isfinite(a).reshape(n, -1).all(axis=1)
      check(finite.all(), f"encode_fn gave non-finite {k!r} (as {dtype}) for example "
            f"{written + int(np.argmin(finite))} of process {process_index}" +
            ("; a float16 cache overflows above 65504: use dtype float32"
             if dtype == "float16" and np.isfinite(arrays[k]).all() else ""))
    for i in range(n):
      record = {k: a[i] for k, a in stored.items()}
      if num_classes:
        record["label"] = int(labels[i])
      if has_captions:
        record["caption"] = str(batch["caption"][i])
      if text is not None:
        record.update({k: a[i] for k, a in text.items()})
      writer.write(serialization.msgpack_serialize(record))
    written += n

  pending = None
  try:
    for batch in batches:
      check(np.asarray(batch["image"]).dtype == np.uint8,
            f"batch images must be uint8, got {np.asarray(batch['image']).dtype}")
      check(num_classes == 0 or "label" in batch,
            f"num_classes={num_classes} but the batches carry no 'label'")
      check(text_fn is None or "caption" in batch,
            "a text-embedding cache (text_fn) needs batches with 'caption'")
      check(num_classes > 0 or "caption" in batch,
            "a label-free cache (num_classes=0) needs batches with 'caption' (its only "
            "condition)")
      encoded = encode_fn(batch["image"])  # dispatched; fetched by flush below
      text = text_fn(list(batch["caption"])) if text_fn is not None else None
      if pending is not None:
        flush(*pending)
      pending = (batch, encoded, text)
    if pending is not None:
      flush(*pending)
  except BaseException:
    writer.close(commit=False)  # the unfinished shard keeps its temporary name
    raise
  writer.close()

  part = {"process_index": process_index, "process_count": process_count,
          "num_examples": written, "shards": writer.shards,
          "latent_shape": list(shape) if shape else None, "captions": bool(captions),
          "store": store, "dtype": dtype, "vae": dict(vae_info), "fingerprint": fingerprint,
          "source": dict(source_info), "num_classes": int(num_classes),
          "text": ({"parts": text_shapes, "info": dict(text_info)} if text_fn is not None
                   else None)}
  _write_json(os.path.join(out_dir, part_name(process_index, process_count)), part)
  if process_count == 1:
    return finalize_cache(out_dir, process_count=1)
  return part


def finalize_cache(out_dir: str, *, process_count: int) -> dict:
  """Process 0, after a barrier: merges every process's part into `manifest.json`.

  Returns:
    The manifest.

  Raises:
    UserError: a part is missing (its process did not finish), parts disagree, a
      listed shard is missing, or the cache would be empty.
  """
  missing = [part_name(p, process_count) for p in range(process_count)
             if not os.path.isfile(os.path.join(out_dir, part_name(p, process_count)))]
  check(not missing, f"latent cache {out_dir!r}: {missing} missing; every writing process "
        "must finish write_cache before process 0 calls finalize_cache (run a barrier)")
  parts = []
  for p in range(process_count):
    with open(os.path.join(out_dir, part_name(p, process_count)), encoding="utf-8") as f:
      parts.append(json.load(f))
  first = parts[0]
  for part in parts[1:]:
    for key in ("store", "dtype", "vae", "fingerprint", "source", "num_classes"):
      check(part[key] == first[key], f"latent cache {out_dir!r}: process "
            f"{part['process_index']} wrote {key}={part[key]!r}, process 0 {first[key]!r}")
  shapes = {tuple(p["latent_shape"]) for p in parts if p["latent_shape"]}
  check(len(shapes) <= 1, f"latent cache {out_dir!r}: processes disagree on the latent "
        f"shape: {sorted(shapes)}")
  captions = {p["captions"] for p in parts if p["num_examples"]}
  check(len(captions) <= 1, f"latent cache {out_dir!r}: only some processes wrote captions")
  # Hosts may mount the pipeline folder at different paths: compare the rest.
  infos = {json.dumps({k: v for k, v in ((p.get("text") or {}).get("info") or {}).items()
                       if k != "pipeline"}, sort_keys=True, default=str) for p in parts}
  check(len(infos) == 1, f"latent cache {out_dir!r}: processes disagree on the text encoders")
  text_parts = [(p.get("text") or {}).get("parts") for p in parts]
  text_parts = [t for t in text_parts if t]
  check(all(t == text_parts[0] for t in text_parts),
        f"latent cache {out_dir!r}: processes disagree on the text embedding shapes")
  if first.get("text"):
    check(os.path.isfile(os.path.join(out_dir, NULL_TEXT)),
          f"latent cache {out_dir!r}: {NULL_TEXT} (process 0's) is missing")
  total = sum(p["num_examples"] for p in parts)
  check(total > 0, f"latent cache {out_dir!r}: no examples were written (empty batches)")
  shards = []
  for part in parts:
    check(sum(s["count"] for s in part["shards"]) == part["num_examples"],
          f"latent cache {out_dir!r}: process {part['process_index']}'s shard counts do not "
          f"add up to its {part['num_examples']} examples")
    for s in part["shards"]:
      check(os.path.isfile(os.path.join(out_dir, s["file"])),
            f"latent cache {out_dir!r}: shard {s['file']} is missing")
      shards.append({"file": s["file"], "count": s["count"], "process": part["process_index"]})
  manifest = {
      "format": FORMAT, "version": VERSION, "num_examples": total,
      "latent_shape": list(shapes.pop()), "store": first["store"], "dtype": first["dtype"],
      "shards": shards, "process_count": process_count, "vae": first["vae"],
      "fingerprint": first["fingerprint"], "source": first["source"],
      "num_classes": first["num_classes"], "captions": bool(captions and captions.pop()),
      "text": ({"parts": text_parts[0], "info": first["text"]["info"], "null": NULL_TEXT}
               if first.get("text") else None),
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }
  _write_json(os.path.join(out_dir, MANIFEST), manifest)
  for p in range(process_count):
    os.remove(os.path.join(out_dir, part_name(p, process_count)))
  return manifest


# ---------------------------------------------------------------- reading


def read_null_text(cache_dir: str) -> dict:
  """The empty prompt's text embeddings of a text cache: {part: array (no batch axis)}
  in the stored dtype."""
  manifest = read_manifest(cache_dir)
  check(bool(manifest.get("text")), f"latent cache {cache_dir!r} holds no text embeddings "
        "(it was written without text encoders)")
  path = os.path.join(cache_dir, manifest["text"]["null"])
  check(os.path.isfile(path), f"latent cache {cache_dir!r}: {path} is missing")
  with open(path, "rb") as f:
    null = serialization.msgpack_restore(f.read())
  return {k: np.asarray(null[k]) for k in manifest["text"]["parts"]}


def read_manifest(cache_dir: str) -> dict:
  """The manifest of a complete latent cache.

  Raises:
    UserError: the directory is missing, has no manifest (an interrupted write, or not
      a cache), or the manifest has another format / an unsupported version.
  """
  check(bool(cache_dir), "no latent cache directory given (set data.latent_cache=DIR)")
  check(os.path.isdir(cache_dir), f"latent cache directory {cache_dir!r} does not exist")
  path = os.path.join(cache_dir, MANIFEST)
  if not os.path.isfile(path):
    shards = [n for n in os.listdir(cache_dir) if _SHARD_RE.fullmatch(n)]
    what = (f"an incomplete latent cache ({len(shards)} shard file{'s' * (len(shards) > 1)} "
            f"but no {MANIFEST}: "
            "its writing was interrupted or not finalised); delete it and encode again"
            if shards else f"not a latent cache (no {MANIFEST})")
    raise UserError(f"{cache_dir!r} is {what}")
  try:
    with open(path, encoding="utf-8") as f:
      manifest = json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f"latent cache manifest {path} is unreadable: {e}") from e
  check(isinstance(manifest, dict) and manifest.get("format") == FORMAT,
        f"{path} is not a latent cache manifest (format {manifest.get('format')!r}, "
        f"expected {FORMAT!r})" if isinstance(manifest, dict) else f"{path} is not a manifest")
  check(manifest.get("version") == VERSION,
        f"latent cache {cache_dir!r} has format version {manifest.get('version')!r}; this "
        f"ldm_jax reads version {VERSION}: encode the dataset again")
  check(manifest.get("store") in STORES and manifest.get("dtype") in DTYPES,
        f"latent cache {cache_dir!r}: bad store/dtype {manifest.get('store')!r}/"
        f"{manifest.get('dtype')!r}")
  return manifest


def check_cache(manifest: Mapping[str, Any], *, fingerprint: str | None = None,
                latent_channels: int | None = None, latent_size: int | None = None,
                num_classes: int | None = None) -> None:
  """Checks a cache against the VAE and the denoiser config that will use it.

  Args:
    manifest: from `read_manifest`.
    fingerprint: `vae_fingerprint` of the VAE that will decode samples, if known.
    latent_channels: the denoiser's `data.channels`.
    latent_size: the denoiser's `data.image_size` (the latent's height = width).
    num_classes: the denoiser's `data.num_classes`.

  Raises:
    UserError: naming the mismatch and the config key to fix.
  """
  h, w, c = manifest["latent_shape"]
  vae = manifest.get("vae") or {}
  vae_name = "/".join(str(vae[k]) for k in ("name", "variant") if vae.get(k)) or "unnamed VAE"
  if fingerprint is not None:
    check(fingerprint == manifest["fingerprint"],
          f"the latent cache was written by a different VAE ({vae_name}, fingerprint "
          f"{manifest['fingerprint'][:12]}) than the one given (fingerprint "
          f"{fingerprint[:12]}); use the same VAE weights or encode the data again")
  if latent_channels is not None:
    check(latent_channels == c, f"the latent cache holds {c}-channel latents ({vae_name}), "
          f"but data.channels={latent_channels}; set data.channels={c}")
  if latent_size is not None:
    check(h == w == latent_size, f"the latent cache holds {h}x{w} latents, but "
          f"data.image_size={latent_size}" + (f"; set data.image_size={h}" if h == w else
                                              " (a latent denoiser needs square latents)"))
  if num_classes is not None:
    check(num_classes == manifest["num_classes"],
          f"the latent cache has {manifest['num_classes']} classes, but data.num_classes="
          f"{num_classes}; set data.num_classes={manifest['num_classes']}")


class LatentCacheSource:
  """A Grain random-access source over a latent cache.

  Records are {"latent": float32 (h, w, c), "label": int32} plus "latent_std": float32
  (h, w, c) for store="mean_std" (the trainer draws latent + latent_std * eps),
  "caption": str when the cache has captions, and a text cache's embedding parts in
  the stored dtype; no "label" when the cache has none (num_classes 0). With a
  `tokenizer` (a callable like WordTokenizer: prompts -> (ids, mask, truncated)), also
  "tokens": int32 (L,) of the caption. Picklable (Grain worker processes).
  """

  def __init__(self, cache_dir: str, tokenizer=None):
    self.cache_dir = cache_dir
    self.tokenizer = tokenizer
    self.manifest = read_manifest(cache_dir)
    shards = self.manifest["shards"]
    paths = [os.path.join(cache_dir, s["file"]) for s in shards]
    missing = [s["file"] for s, p in zip(shards, paths) if not os.path.isfile(p)]
    check(not missing, f"latent cache {cache_dir!r} is missing shard files {missing[:5]}")
    self._records = grain.sources.ArrayRecordDataSource(paths)
    check(len(self._records) == self.manifest["num_examples"],
          f"latent cache {cache_dir!r}: the shards hold {len(self._records)} records, its "
          f"manifest says {self.manifest['num_examples']}; the cache is damaged: encode again")
    self._keys = _STORE_KEYS[self.manifest["store"]]
    self._captions = bool(self.manifest.get("captions"))
    self._labels = int(self.manifest["num_classes"]) > 0
    self._text = tuple((self.manifest.get("text") or {}).get("parts") or ())

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict:
    record = serialization.msgpack_restore(self._records[index])
    out = {"latent": np.asarray(record[self._keys[0]], np.float32)}
    if len(self._keys) == 2:
      out["latent_std"] = np.asarray(record[self._keys[1]], np.float32)
    if self._labels:
      out["label"] = np.int32(record["label"])
    if self._captions:
      out["caption"] = record["caption"]
      if self.tokenizer is not None:
        out["tokens"] = np.asarray(self.tokenizer([record["caption"]])[0][0], np.int32)
    for k in self._text:  # kept in the stored dtype (float16 halves the host traffic)
      out[k] = np.asarray(record[k])
    return out

  def __repr__(self) -> str:
    m = self.manifest
    return (f"LatentCacheSource({self.cache_dir!r}, {m['num_examples']} x "
            f"{tuple(m['latent_shape'])} {m['store']} {m['dtype']})")
