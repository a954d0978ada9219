"""Strict, table-driven tensor conversion shared by all checkpoint converters.

A converter describes a checkpoint as a list of `Rule`s: each names one ldm_jax
parameter (a '/'-joined path such as "blocks_0/attn/qkv/kernel"), the source
tensors it is made from, their expected shapes, and a pair of functions mapping
source -> ours (`fwd`) and ours -> source (`inv`). The same table therefore serves
import (`convert_tensors`) and export (`export_tensors`). Nothing is renamed by
pattern: a source tensor that no rule names is an error, not silently dropped.

Readers return flat `{name: np.ndarray}` dicts: `load_safetensors` (file, folder,
or sharded folder with an index json; no torch needed) and
`load_torch_state_dict` (legacy `.pt`/`.pth`/`.ckpt`; torch imported lazily and
loaded with `weights_only=True`).
"""

import dataclasses
import glob
import json
import os
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from ldm_jax.errors import UserError

Shape = tuple[int, ...]


def _identity(x: np.ndarray) -> np.ndarray:
  return x


def _one(x: np.ndarray) -> tuple[np.ndarray]:
  return (x,)


@dataclasses.dataclass(frozen=True)
class Rule:
  """One ldm_jax parameter and the source tensors it comes from.

  Attributes:
    target: '/'-joined path of the parameter in the ldm_jax params tree.
    sources: source tensor names, in the order `fwd` takes them.
    shapes: expected shape of each source tensor.
    fwd: source arrays -> our array.
    inv: our array -> tuple of source arrays (one per source; a single array
      when `tied`).
    tied: the sources are copies of one tensor (diffusers' per-block embedders):
      they must all be exactly equal; `fwd` receives only the first, and export
      writes the same array under every source name.
  """
  target: str
  sources: tuple[str, ...]
  shapes: tuple[Shape, ...]
  fwd: Callable[..., np.ndarray] = _identity
  inv: Callable[[np.ndarray], tuple[np.ndarray, ...]] = _one
  tied: bool = False


def same(target: str, source: str, shape: Shape) -> Rule:
  """A tensor copied unchanged (biases, embedding tables)."""
  return Rule(target, (source,), (tuple(shape),))


def linear_kernel(target: str, source: str, d_in: int, d_out: int) -> Rule:
  """torch `Linear.weight` (out, in) <-> Flax `Dense.kernel` (in, out)."""
  return Rule(target, (source,), ((d_out, d_in),), fwd=lambda w: w.T,
              inv=lambda k: (k.T,))


def linear(prefix: str, source: str, d_in: int, d_out: int) -> list[Rule]:
  """Kernel and bias rules for a torch `Linear` named `source` -> Dense `prefix`."""
  return [linear_kernel(f"{prefix}/kernel", f"{source}.weight", d_in, d_out),
          same(f"{prefix}/bias", f"{source}.bias", (d_out,))]


def conv2d(prefix: str, source: str, c_in: int, c_out: int, kernel: int) -> list[Rule]:
  """torch `Conv2d` (OIHW weight) <-> Flax NHWC `Conv` (HWIO kernel) plus bias."""
  return [Rule(f"{prefix}/kernel", (f"{source}.weight",), ((c_out, c_in, kernel, kernel),),
               fwd=lambda w: w.transpose(2, 3, 1, 0), inv=lambda k: (k.transpose(3, 2, 0, 1),)),
          same(f"{prefix}/bias", f"{source}.bias", (c_out,))]


def tie(rule: Rule, sources: Sequence[str]) -> Rule:
  """Single-source `rule` read instead from identical copies `sources` (the first
  is used; the others must equal it)."""
  if len(rule.sources) != 1 or not sources:
    raise ValueError(f"tie(): {rule.target} needs one source and some copies")
  return dataclasses.replace(rule, sources=tuple(sources), shapes=rule.shapes * len(sources),
                             tied=True)


def _problems_message(what: str, problems: list[str],
                      hint: str = "is it the right file and model variant?") -> str:
  return (f"{what}: {len(problems)} problem(s) with the tensors ({hint}):\n  "
          + "\n  ".join(problems))


def convert_tensors(source: Mapping[str, np.ndarray], rules: Iterable[Rule], *, what: str,
                    ignore: Iterable[str] = (), dtype=np.float32) -> dict:
  """Builds a nested ldm_jax params dict from `source` following `rules` exactly.

  Args:
    source: flat {tensor name: array} of the checkpoint.
    rules: the explicit key table.
    what: name of the checkpoint kind, used in the error message.
    ignore: source names that may be present and are not converted (buffers the
      caller checks itself).
    dtype: dtype of the returned arrays (None keeps the source dtype).
  Returns:
    Nested dict of numpy arrays, keyed like the Flax params tree.
  Raises:
    UserError listing every missing, unused, mis-shaped or disagreeing tensor.
  """
  rules = list(rules)
  problems, used = [], set(ignore)
  targets = [r.target for r in rules]
  if len(set(targets)) != len(targets):
    raise ValueError(f"{what}: key table has duplicate targets")  # a bug, not user error
  for r in rules:
    for name, shape in zip(r.sources, r.shapes):
      used.add(name)
      if name not in source:
        problems.append(f"missing: {name} (expected shape {shape})")
      elif tuple(source[name].shape) != tuple(shape):
        problems.append(f"wrong shape: {name} is {tuple(source[name].shape)}, expected {shape}")
    if r.tied and all(n in source and tuple(source[n].shape) == s
                      for n, s in zip(r.sources, r.shapes)):
      first = np.asarray(source[r.sources[0]])
      for name in r.sources[1:]:
        if not np.array_equal(np.asarray(source[name]), first):
          problems.append(f"copies differ: {name} != {r.sources[0]} (ldm_jax keeps one shared "
                          f"{r.target}; this checkpoint has distinct per-block copies)")
  for name in sorted(set(source) - used):
    problems.append(f"unused: {name} (shape {tuple(np.shape(source[name]))})")
  if problems:
    raise UserError(_problems_message(what, problems))
  out = {}
  for r in rules:
    args = [np.asarray(source[n]) for n in (r.sources[:1] if r.tied else r.sources)]
    value = np.asarray(r.fwd(*args))
    out[r.target] = np.ascontiguousarray(value if dtype is None else value.astype(dtype))
  return unflatten(out)


def export_tensors(params, rules: Iterable[Rule], *, what: str, dtype=np.float32
                   ) -> dict[str, np.ndarray]:
  """Inverse of `convert_tensors`: ldm_jax params -> flat {source name: array}.

  Fails with a `UserError` if `params` lacks a parameter the table needs or has
  one it does not know, or if a shape disagrees with the table.
  """
  rules = list(rules)
  flat = flatten_params(params)
  known = {r.target for r in rules}
  problems = [f"unused parameter: {k} (shape {v.shape})"
              for k, v in sorted(flat.items()) if k not in known]
  out = {}
  for r in rules:
    if r.target not in flat:
      problems.append(f"missing parameter: {r.target}")
      continue
    try:
      parts = r.inv(np.asarray(flat[r.target]))
    except ValueError:  # a reshape that does not fit
      problems.append(f"wrong shape: {r.target} {flat[r.target].shape} cannot make "
                      f"{list(zip(r.sources, r.shapes))}")
      continue
    parts = parts * len(r.sources) if r.tied else parts
    for name, shape, value in zip(r.sources, r.shapes, parts):
      if tuple(value.shape) != tuple(shape):
        problems.append(f"wrong shape: {r.target} gives {name} of shape {tuple(value.shape)}, "
                        f"expected {shape}")
      out[name] = np.ascontiguousarray(value if dtype is None else value.astype(dtype))
  if problems:
    raise UserError(_problems_message(what, problems, "do the params match the config?"))
  return out


def _flat(params) -> dict:
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  from flax import traverse_util  # pylint: disable=import-outside-toplevel
  params = nn.unbox(params)
  if isinstance(params, Mapping) and set(params) == {"params"}:
    params = params["params"]
  return traverse_util.flatten_dict(dict(params), sep="/")


def flatten_params(params) -> dict[str, np.ndarray]:
  """Flat {'a/b/kernel': np.ndarray} of a (possibly boxed, possibly jax) params tree."""
  return {k: np.asarray(v) for k, v in _flat(params).items()}


def unflatten(flat: Mapping[str, np.ndarray]) -> dict:
  """{'a/b': x} -> {'a': {'b': x}}."""
  out: dict = {}
  for key, value in flat.items():
    node = out
    *parents, leaf = key.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return out


def check_tree_matches(params, expected, *, what: str) -> None:
  """Raises `UserError` unless `params` has exactly the leaves and shapes of
  `expected` (e.g. `jax.eval_shape` of the model's init)."""
  got = {k: tuple(v.shape) for k, v in _flat(params).items()}
  want = {k: tuple(v.shape) for k, v in _flat(expected).items()}
  problems = [f"missing: {k} (model expects {s})" for k, s in want.items() if k not in got]
  problems += [f"unexpected: {k} {s} (model has no such parameter)" for k, s in got.items()
               if k not in want]
  problems += [f"wrong shape: {k} is {got[k]}, model expects {s}" for k, s in want.items()
               if k in got and got[k] != s]
  if problems:
    raise UserError(_problems_message(what, sorted(problems),
                                      "do the params match the config?"))


def read_json(path: str) -> dict:
  """A JSON file as a dict; `UserError` naming the file if absent or malformed."""
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError as e:
    raise UserError(f"{path} not found") from e
  except json.JSONDecodeError as e:
    raise UserError(f"{path} is not valid JSON: {e}") from e


def write_json(obj, path: str) -> None:
  """Writes `obj` as indented JSON."""
  with open(path, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")


def _load_safetensors_file(path: str) -> dict[str, np.ndarray]:
  import safetensors.numpy  # pylint: disable=import-outside-toplevel
  try:
    return dict(safetensors.numpy.load_file(path))
  except TypeError:  # bfloat16 has no plain numpy dtype: read through jax / ml_dtypes
    from safetensors import safe_open  # pylint: disable=import-outside-toplevel
    with safe_open(path, framework="flax") as f:
      return {k: np.asarray(f.get_tensor(k)) for k in f.keys()}
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f"cannot read safetensors file {path}: {e}") from e


def load_safetensors(path: str, *, stem: str = "diffusion_pytorch_model",
                     variant: str | None = None) -> dict[str, np.ndarray]:
  """Reads safetensors weights into a flat {name: np.ndarray} (no torch needed).

  Args:
    path: a `.safetensors` file, or a folder holding `{stem}[.{variant}].safetensors`
      or its shards listed by `{stem}[.{variant}].safetensors.index.json`.
    stem: file name stem inside a folder (diffusers: "diffusion_pytorch_model").
    variant: optional weight variant such as "fp16".
  """
  if os.path.isfile(path):
    return _load_safetensors_file(path)
  if not os.path.isdir(path):
    raise UserError(f"{path}: no such safetensors file or folder")
  name = f"{stem}.{variant}.safetensors" if variant else f"{stem}.safetensors"
  single, index = os.path.join(path, name), os.path.join(path, name + ".index.json")
  if os.path.isfile(single):
    return _load_safetensors_file(single)
  if os.path.isfile(index):
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
      raise UserError(f"{index} has no 'weight_map' object")
    out: dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
      tensors = _load_safetensors_file(os.path.join(path, shard))
      stray = sorted(k for k in tensors if weight_map.get(k) != shard)
      if stray:
        raise UserError(f"{shard} holds tensors that {index} does not assign to it: {stray}")
      out.update(tensors)
    absent = sorted(set(weight_map) - set(out))
    if absent:
      raise UserError(f"{index} lists tensors found in no shard: {absent}")
    return out
  found = sorted(os.path.basename(p) for p in glob.glob(os.path.join(path, "*.safetensors*")))
  raise UserError(f"{path}: neither {name} nor {name}.index.json found"
                  f" (safetensors files present: {found or 'none'})")


def save_safetensors(tensors: Mapping[str, np.ndarray], path: str) -> None:
  """Writes a flat {name: np.ndarray} as one safetensors file (PyTorch-readable)."""
  import safetensors.numpy  # pylint: disable=import-outside-toplevel
  safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, path,
                              metadata={"format": "pt"})


def load_torch_state_dict(path: str, *, prefer: Sequence[str] = ()) -> dict[str, np.ndarray]:
  """Reads a legacy PyTorch checkpoint into a flat {name: np.ndarray}.

  Loaded with `torch.load(path, map_location='cpu', weights_only=True)`, so only
  tensors and plain containers are unpickled (no code runs). torch is imported
  here and only here; without it a `UserError` says how to proceed.

  Args:
    path: the `.pt` / `.pth` / `.ckpt` file.
    prefer: keys of a wrapping dict to descend into, first match wins (e.g.
      ("ema", "model") for DiT training checkpoints).
  """
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise UserError(f"reading {path} needs PyTorch (pip install torch, CPU build is "
                    "enough), or convert it to safetensors elsewhere first") from e
  if not os.path.isfile(path):
    raise UserError(f"{path}: no such checkpoint file")
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f"cannot load {path} with torch.load(weights_only=True): {e}. If it holds "
                    "Python objects besides tensors, re-save just its state_dict.") from e
  for key in prefer:
    if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
      obj = obj[key]
      break
  if not isinstance(obj, Mapping):
    raise UserError(f"{path} holds a {type(obj).__name__}, not a state dict")
  bad = sorted(k for k, v in obj.items() if not isinstance(v, torch.Tensor))
  if bad:
    raise UserError(f"{path}: entries that are not tensors: {bad}"
                    + (f" (descend into one of {list(prefer)}?)" if prefer else ""))
  out = {}
  for k, v in obj.items():
    v = v.detach()
    if v.dtype == torch.bfloat16:  # numpy has no bfloat16
      v = v.float()
    out[k] = v.numpy()
  return out
