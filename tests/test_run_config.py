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
