"""Text-to-image from a local diffusers SD3 / SD3.5 pipeline folder, written as PNGs.

  python -m ldm_jax.generate --pipeline=/models/stable-diffusion-3.5-medium \
      --prompt="a red circle left of a blue square" [--prompt=... | --prompts_file=F] \
      --out=DIR [--negative_prompt=...] [--height=1024 --width=1024] [--steps=28] \
      [--guidance_scale=7.0] [--seed=0] [--num_images_per_prompt=1] [--batch_size=4] \
      [--max_sequence_length=256] [--dtype=bfloat16] [--no_t5] [--skip_guidance_layers=7,8,9]

Images go to DIR/NNNNN.png numbered after any PNGs already there (nothing is
overwritten), with DIR/prompts.txt appended (one "NNNNN.png<TAB>prompt" line each;
backslash, tab and newline in a prompt written as \\, \t, \n).
Mistakes (not an SD3 folder, bad size, missing tokenizer) end with one line
`error: ...` and exit status 2.
"""

import os
import re
import sys

from absl import app, flags

from ldm_jax.errors import UserError, check

_PIPELINE = flags.DEFINE_string("pipeline", None, "Local diffusers SD3 pipeline folder.")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "A prompt (repeat the flag for several).")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "A file with one prompt per line.")
_OUT = flags.DEFINE_string("out", None, "Output folder for the PNGs.")
_NEGATIVE = flags.DEFINE_string("negative_prompt", None, "Negative prompt for every image.")
_HEIGHT = flags.DEFINE_integer("height", None, "Image height (default: the model's).")
_WIDTH = flags.DEFINE_integer("width", None, "Image width (default: the model's).")
_STEPS = flags.DEFINE_integer("steps", 28, "Number of sampling steps.")
_GUIDANCE = flags.DEFINE_float("guidance_scale", 7.0, "Classifier-free guidance scale.")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed (batch k uses seed + k).")
_NUM = flags.DEFINE_integer("num_images_per_prompt", 1, "Images per prompt.")
_BATCH = flags.DEFINE_integer("batch_size", 4, "Prompts per generation call.")
_MAX_LEN = flags.DEFINE_integer("max_sequence_length", 256, "T5 token length.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_NO_T5 = flags.DEFINE_bool("no_t5", False, "Do not load text_encoder_3 (T5): zeros instead.")
_SLG = flags.DEFINE_list("skip_guidance_layers", [], "Skip-layer guidance blocks (SD3.5-M: 7,8,9).")


def read_prompts(prompts, prompts_file) -> list[str]:
  """Prompts from the flags: repeated --prompt and/or a file (blank / # lines skipped)."""
  out = list(prompts)
  if prompts_file:
    check(os.path.isfile(prompts_file), f"--prompts_file={prompts_file!r} does not exist")
    with open(prompts_file, encoding="utf-8") as f:
      out += [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
  check(out, "no prompt: give --prompt=TEXT (repeatable) or --prompts_file=FILE")
  return out


def next_index(folder: str) -> int:
  """1 + the largest NNNNN of NNNNN.png in `folder` (0 if none)."""
  numbers = [int(m.group(1)) for name in os.listdir(folder)
             if (m := re.fullmatch(r"(\d{5,})\.png", name))]
  return max(numbers, default=-1) + 1


def escape(prompt: str) -> str:
  """A prompt on one prompts.txt line: backslash, tab and newline escaped."""
  return prompt.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")


def save_png(image, path: str) -> None:
  """float [0, 1] HWC -> 8-bit PNG, never replacing an existing file."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  pixels = np.clip(np.round(np.asarray(image) * 255), 0, 255).astype(np.uint8)
  with open(path, "xb") as f:  # "x": fails rather than overwrite
    Image.fromarray(pixels).save(f, format="PNG")


def generate(argv=None) -> list[str]:
  """Runs the generation the flags describe; returns the written paths."""
  del argv
  from ldm_jax.pipelines.sd3 import StableDiffusion3Pipeline  # pylint: disable=import-outside-toplevel
  check(_PIPELINE.value, "give --pipeline=DIR (a local diffusers SD3 pipeline folder)")
  check(_OUT.value, "give --out=DIR (the folder for the PNGs)")
  # Every flag is checked before the (large) pipeline loads.
  for name, value, low in (("batch_size", _BATCH.value, 1), ("steps", _STEPS.value, 1),
                           ("num_images_per_prompt", _NUM.value, 1),
                           ("max_sequence_length", _MAX_LEN.value, 1),
                           ("height", _HEIGHT.value, 1), ("width", _WIDTH.value, 1)):
    check(value is None or value >= low, f"--{name}={value} must be >= {low}")
  try:
    skip_layers = [int(i) for i in _SLG.value]
  except ValueError as e:
    raise UserError(f"--skip_guidance_layers={','.join(_SLG.value)}: give block indices "
                    "such as 7,8,9") from e
  prompts = read_prompts(_PROMPT.value, _PROMPTS_FILE.value)
  pipe = StableDiffusion3Pipeline.from_diffusers(_PIPELINE.value, dtype=_DTYPE.value,
                                                 load_t5=not _NO_T5.value)
  os.makedirs(_OUT.value, exist_ok=True)
  index = next_index(_OUT.value)
  written = []
  for k, start in enumerate(range(0, len(prompts), _BATCH.value)):
    chunk = prompts[start:start + _BATCH.value]
    images = pipe(chunk, negative_prompt=_NEGATIVE.value, height=_HEIGHT.value,
                  width=_WIDTH.value, num_inference_steps=_STEPS.value,
                  guidance_scale=_GUIDANCE.value, num_images_per_prompt=_NUM.value,
                  seed=_SEED.value + k, max_sequence_length=_MAX_LEN.value,
                  skip_guidance_layers=skip_layers or None)
    lines = []
    for j, image in enumerate(images):
      name = f"{index:05d}.png"
      save_png(image, os.path.join(_OUT.value, name))
      lines.append(f"{name}\t{escape(chunk[j // _NUM.value])}\n")
      written.append(os.path.join(_OUT.value, name))
      index += 1
    with open(os.path.join(_OUT.value, "prompts.txt"), "a", encoding="utf-8") as f:
      f.writelines(lines)
  print(f"wrote {len(written)} image(s) to {_OUT.value}")
  return written


def main(argv):
  try:
    generate(argv)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
