"""Workdir and config checks that the CLI tests cannot reach as root or on one device."""

import os
import types

import pytest

from ldm_jax import run_config
from ldm_jax.errors import UserError
from ldm_jax.training.sharding import check_batch_divisible


def test_workdir_not_writable(tmp_path, monkeypatch):
  monkeypatch.setattr(os, "access", lambda path, mode: False)  # root can write anywhere
  with pytest.raises(UserError, match="is not writable"):
    run_config.prepare_workdir(str(tmp_path))


def test_corrupt_config_json_is_a_clear_error(tmp_path):
  (tmp_path / run_config.CONFIG_FILE).write_text("{not json")
  with pytest.raises(UserError, match="config.json is not valid JSON"):
    run_config.read_saved_config(str(tmp_path))


def test_batch_must_split_over_data_parallel_devices():
  fake = types.SimpleNamespace(spec=(("data", "fsdp"),),
                               mesh=types.SimpleNamespace(shape={"data": 4, "fsdp": 2}))
  check_batch_divisible(16, fake)
  with pytest.raises(UserError, match="data.batch_size=12 does not split over the 8"):
    check_batch_divisible(12, fake)


def test_execution_only_model_knobs_may_change_on_resume():
  """remat / attention backend / compute dtype change how the step computes, not the
  state: a run resumes with other values. qk_norm and scan_layers change the params."""
  from tests.helpers import tiny_config
  saved = run_config.config_to_dict(tiny_config())
  for key in ("remat", "attention", "dtype"):
    del saved["model"][key]  # a config written before the knobs existed: knobs off
  assert run_config.incompatible_keys(saved, tiny_config()) == []
  changed = tiny_config(**{"model.remat": "full", "model.attention": "auto",
                           "model.dtype": "bfloat16"})
  assert run_config.incompatible_keys(saved, changed) == []
  assert run_config.incompatible_keys(saved, tiny_config(**{"model.qk_norm": True})) == [
      "model.qk_norm"]
  assert run_config.incompatible_keys(saved, tiny_config(**{"model.scan_layers": True})) == [
      "model.scan_layers"]


def test_url_workdirs_are_refused_with_the_alternative(tmp_path):
  with pytest.raises(UserError, match=r"--workdir 'gs://b/runs/x': URLs .* not supported"):
    run_config.prepare_workdir("gs://b/runs/x")
  assert not os.path.exists("gs:")
