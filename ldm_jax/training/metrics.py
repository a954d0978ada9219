"""Progress on the console and TensorBoard event files written with tensorboardX
(protobuf only: no TensorFlow), plus image grids."""

import logging
import time

import numpy as np

logger = logging.getLogger("ldm_jax")


def image_grid(images: np.ndarray, columns: int | None = None) -> np.ndarray:
  """uint8 (N, H, W, C) -> one uint8 (rows*H, columns*W, C) grid with 2-px borders."""
  n, h, w, c = images.shape
  columns = columns or int(np.ceil(np.sqrt(n)))
  rows = int(np.ceil(n / columns))
  pad = 2
  grid = np.zeros((rows * (h + pad) + pad, columns * (w + pad) + pad, c), np.uint8)
  for i in range(n):
    r, col = divmod(i, columns)
    grid[pad + r * (h + pad):pad + r * (h + pad) + h,
         pad + col * (w + pad):pad + col * (w + pad) + w] = images[i]
  return grid


class MetricWriter:
  """TensorBoard scalars and images under `logdir` (process 0 only writes)."""

  def __init__(self, logdir: str, enabled: bool = True):
    self.writer = None
    if enabled:
      from tensorboardX import SummaryWriter
      self.writer = SummaryWriter(logdir=logdir, flush_secs=30)

  def scalars(self, step: int, values: dict):
    if self.writer:
      for key, value in values.items():
        self.writer.add_scalar(key, float(value), step)

  def image(self, step: int, tag: str, image_hwc: np.ndarray):
    if self.writer:
      self.writer.add_image(tag, image_hwc, step, dataformats="HWC")

  def close(self):
    if self.writer:
      self.writer.flush()
      self.writer.close()


class Progress:
  """Console lines: step, metrics, steps/s and ETA over the last reporting window."""

  def __init__(self, total_steps: int, start_step: int):
    self.total, self.last_step, self.last_time = total_steps, start_step, time.time()

  def report(self, step: int, metrics: dict) -> dict:
    now = time.time()
    rate = (step - self.last_step) / max(now - self.last_time, 1e-9)
    eta = (self.total - step) / max(rate, 1e-9)
    self.last_step, self.last_time = step, now
    text = " ".join(f"{k} {v:.4g}" for k, v in metrics.items())
    logger.info("step %d/%d  %s  %.2f steps/s  ETA %dm%02ds", step, self.total, text, rate,
                int(eta // 60), int(eta % 60))
    return {"steps_per_sec": rate}
