#!/usr/bin/env bash
# Train, then sample, one config on this machine.
#   launch/local/train.sh configs/quickstart.py runs/quickstart [--config.key=value ...]
set -euo pipefail
config=${1:?usage: train.sh CONFIG[:preset] WORKDIR [overrides...]}
workdir=${2:?usage: train.sh CONFIG[:preset] WORKDIR [overrides...]}
shift 2
python -m ldm_jax.main --config="$config" --workdir="$workdir" --mode=train "$@"
python -m ldm_jax.main --config="$config" --workdir="$workdir" --mode=sample "$@"
