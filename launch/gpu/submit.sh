#!/usr/bin/env bash
# Build and submit the sbatch command for launch/gpu/slurm.sbatch.
#   launch/gpu/submit.sh --nodes=4 --gpus-per-node=8 --config=configs/quickstart.py:dit \
#       --workdir=/shared/runs/dit [--per-gpu] [--partition=P] [--dry-run] [-- OVERRIDES...]
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=launch/common.sh
source "$here/../common.sh"

VALID_OPTIONS="--nodes N, --gpus-per-node G, --per-gpu, --config C, --workdir W, --mode M, --port P, --partition P, --account A, --time T, --job-name J, --dry-run, --help, -- OVERRIDES..."

usage() {
  cat <<USAGE
usage: launch/gpu/submit.sh --nodes=N --gpus-per-node=G --config=C --workdir=W [options] [-- OVERRIDES...]

Submits launch/gpu/slurm.sbatch: one process per node seeing all its GPUs (default),
or one per GPU (--per-gpu). Process 0's node is the coordinator (HOST:PORT).

  --nodes N            nodes (default 1)
  --gpus-per-node G    GPUs per node (default 8)
  --per-gpu            one process per GPU instead of per node
  --config C           config file[:preset] (required)
  --workdir W          workdir on a shared filesystem (required)
  --mode M             train (default), sample or bpd
  --port P             coordinator port (default 12355)
  --partition P, --account A, --time T (default 24:00:00), --job-name J (default ldm_jax)
  --dry-run            print the sbatch command, submit nothing
  --help               this text
USAGE
}

nodes=1 gpus=8 per_gpu=0 config="" workdir="" mode=train port=12355 partition="" account=""
time_limit=24:00:00 job_name=ldm_jax
overrides=()
while (( $# )); do
  if [[ $1 == --*=* ]]; then set -- "${1%%=*}" "${1#*=}" "${@:2}"; fi
  case $1 in
    --nodes) need_value "$1" $#; nodes=$2; shift 2 ;;
    --gpus-per-node) need_value "$1" $#; gpus=$2; shift 2 ;;
    --per-gpu) per_gpu=1; shift ;;
    --config) need_value "$1" $#; config=$2; shift 2 ;;
    --workdir) need_value "$1" $#; workdir=$2; shift 2 ;;
    --mode) need_value "$1" $#; mode=$2; shift 2 ;;
    --port) need_value "$1" $#; port=$2; shift 2 ;;
    --partition) need_value "$1" $#; partition=$2; shift 2 ;;
    --account) need_value "$1" $#; account=$2; shift 2 ;;
    --time) need_value "$1" $#; time_limit=$2; shift 2 ;;
    --job-name) need_value "$1" $#; job_name=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; overrides=("$@"); break ;;
    *) fail_usage "unknown option $1" ;;
  esac
done
require "$config" --config
require "$workdir" --workdir
[[ $nodes =~ ^[1-9][0-9]*$ ]] || fail_usage "--nodes must be a positive integer, got '$nodes'"
[[ $gpus =~ ^[1-9][0-9]*$ ]] || fail_usage "--gpus-per-node must be a positive integer, got '$gpus'"
case $mode in train|sample|bpd) ;; *) fail_usage "unknown --mode '$mode' (train, sample, bpd)" ;; esac

tasks_per_node=1
(( per_gpu )) && tasks_per_node=$gpus
cmd=(sbatch "--job-name=$job_name" "--chdir=$(cd "$here/../.." && pwd)" "--nodes=$nodes" "--ntasks-per-node=$tasks_per_node"
     "--gpus-per-node=$gpus" "--time=$time_limit")
[[ -z $partition ]] || cmd+=("--partition=$partition")
[[ -z $account ]] || cmd+=("--account=$account")
cmd+=("--export=ALL,LDM_JAX_PORT=$port,LDM_JAX_PER_GPU=$per_gpu"
      "$here/slurm.sbatch" "$config" "$workdir" "--mode=$mode" "${overrides[@]}")
run "${cmd[@]}"
