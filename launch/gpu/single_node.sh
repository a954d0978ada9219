#!/usr/bin/env bash
# One process on this machine seeing all its GPUs (or those of --gpus); no coordinator.
#   launch/gpu/single_node.sh --config=configs/quickstart.py:dit --workdir=runs/dit [--gpus=0,1] [-- OVERRIDES...]
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=launch/common.sh
source "$here/../common.sh"

VALID_OPTIONS="--config C, --workdir W, --mode M, --gpus LIST, --python P, --dry-run, --help, -- OVERRIDES..."

usage() {
  cat <<USAGE
usage: launch/gpu/single_node.sh --config=C --workdir=W [--gpus=0,1,...] [--mode=M] [--dry-run] [-- OVERRIDES...]

Runs python -m ldm_jax.main once; JAX uses every visible GPU as one mesh.
  --gpus LIST   restrict to these GPUs (sets CUDA_VISIBLE_DEVICES); default all
  --mode M      train (default), sample or bpd
  --python P    interpreter (default python)
USAGE
}

config="" workdir="" mode=train gpus="" python=python
overrides=()
while (( $# )); do
  if [[ $1 == --*=* ]]; then set -- "${1%%=*}" "${1#*=}" "${@:2}"; fi
  case $1 in
    --config) need_value "$1" $#; config=$2; shift 2 ;;
    --workdir) need_value "$1" $#; workdir=$2; shift 2 ;;
    --mode) need_value "$1" $#; mode=$2; shift 2 ;;
    --gpus) need_value "$1" $#; gpus=$2; shift 2 ;;
    --python) need_value "$1" $#; python=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; overrides=("$@"); break ;;
    *) fail_usage "unknown option $1" ;;
  esac
done
require "$config" --config
require "$workdir" --workdir
[[ -z $gpus || $gpus =~ ^[0-9]+(,[0-9]+)*$ ]] || fail_usage "--gpus must be a list like 0,1,2, got '$gpus'"
case $mode in train|sample|bpd) ;; *) fail_usage "unknown --mode '$mode' (train, sample, bpd)" ;; esac
cmd=("$python" -m ldm_jax.main "--config=$config" "--workdir=$workdir" "--mode=$mode" "${overrides[@]}")
[[ -z $gpus ]] || cmd=(env "CUDA_VISIBLE_DEVICES=$gpus" "${cmd[@]}")
run "${cmd[@]}"
