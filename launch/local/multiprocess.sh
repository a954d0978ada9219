#!/usr/bin/env bash
# N training processes on this machine, one coordinator (what the multi-process test uses).
#   launch/local/multiprocess.sh -n 2 --config=configs/quickstart.py:tiny --workdir=runs/mp [-- --config.key=value ...]
#
# Contract with ldm_jax (environment variables, read by the entry point to call
# jax.distributed.initialize(coordinator_address, num_processes, process_id)):
#   LDM_JAX_COORDINATOR=127.0.0.1:PORT  LDM_JAX_NUM_PROCESSES=N  LDM_JAX_PROCESS_ID=0..N-1
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=launch/common.sh
source "$here/../common.sh"

VALID_OPTIONS="-n/--num-processes N, --config C, --workdir W, --mode train|sample|bpd, --port P, --host H, --log-dir D, --python P, --dry-run, --help, -- OVERRIDES..."

usage() {
  cat <<USAGE
usage: launch/local/multiprocess.sh -n N --config=CONFIG[:preset] --workdir=DIR [options] [-- OVERRIDES...]

Starts N processes of 'python -m ldm_jax.main' on this machine with coordinator
HOST:PORT and process ids 0..N-1, passed as LDM_JAX_COORDINATOR,
LDM_JAX_NUM_PROCESSES and LDM_JAX_PROCESS_ID. Process 0 writes to this terminal,
process i > 0 to LOG_DIR/process_i.log. If one process fails the others are stopped.

  -n, --num-processes N   number of processes (required, >= 1)
  --config C              config file[:preset] (required)
  --workdir W             shared workdir (required)
  --mode M                train (default), sample or bpd
  --port P                coordinator port (default 12355)
  --host H                coordinator host (default 127.0.0.1)
  --log-dir D             logs of processes 1..N-1 (default WORKDIR/logs)
  --python P              interpreter (default python)
  --dry-run               print every command, run nothing
  --help                  this text
  -- OVERRIDES...         passed on, e.g. --config.num_train_steps=10
USAGE
}

num="" config="" workdir="" mode=train port=12355 host=127.0.0.1 log_dir="" python=python
overrides=()
while (( $# )); do
  if [[ $1 == --*=* ]]; then set -- "${1%%=*}" "${1#*=}" "${@:2}"; fi
  case $1 in
    -n|--num-processes) need_value "$1" $#; num=$2; shift 2 ;;
    --config) need_value "$1" $#; config=$2; shift 2 ;;
    --workdir) need_value "$1" $#; workdir=$2; shift 2 ;;
    --mode) need_value "$1" $#; mode=$2; shift 2 ;;
    --port) need_value "$1" $#; port=$2; shift 2 ;;
    --host) need_value "$1" $#; host=$2; shift 2 ;;
    --log-dir) need_value "$1" $#; log_dir=$2; shift 2 ;;
    --python) need_value "$1" $#; python=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; overrides=("$@"); break ;;
    *) fail_usage "unknown option $1" ;;
  esac
done
require "$num" "-n/--num-processes"
require "$config" "--config"
require "$workdir" "--workdir"
[[ $num =~ ^[1-9][0-9]*$ ]] || fail_usage "-n must be a positive integer, got '$num'"
[[ $port =~ ^[0-9]+$ ]] || fail_usage "--port must be a number, got '$port'"
case $mode in train|sample|bpd) ;; *) fail_usage "unknown --mode '$mode' (train, sample, bpd)" ;; esac
log_dir=${log_dir:-$workdir/logs}


if (( DRY_RUN )); then
  command_line mkdir -p "$log_dir"
  for (( i = 1; i < num; i++ )); do
    printf '%s > %s 2>&1 &\n' \
      "$(command_line env "LDM_JAX_COORDINATOR=$host:$port" "LDM_JAX_NUM_PROCESSES=$num" "LDM_JAX_PROCESS_ID=$i" \
         "$python" -m ldm_jax.main "--config=$config" "--workdir=$workdir" "--mode=$mode" "${overrides[@]}")" \
      "$(shell_quote "$log_dir/process_$i.log")"
  done
  command_line env "LDM_JAX_COORDINATOR=$host:$port" "LDM_JAX_NUM_PROCESSES=$num" "LDM_JAX_PROCESS_ID=0" \
    "$python" -m ldm_jax.main "--config=$config" "--workdir=$workdir" "--mode=$mode" "${overrides[@]}"
  echo wait
  exit 0
fi

mkdir -p "$log_dir"
pids=()
stop_others() {
  local pid
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap stop_others INT TERM
for (( i = 1; i < num; i++ )); do
  env "LDM_JAX_COORDINATOR=$host:$port" "LDM_JAX_NUM_PROCESSES=$num" "LDM_JAX_PROCESS_ID=$i" \
    "$python" -m ldm_jax.main "--config=$config" "--workdir=$workdir" "--mode=$mode" "${overrides[@]}" \
    > "$log_dir/process_$i.log" 2>&1 &
  pids+=("$!")
done
status=0
env "LDM_JAX_COORDINATOR=$host:$port" "LDM_JAX_NUM_PROCESSES=$num" "LDM_JAX_PROCESS_ID=0" \
  "$python" -m ldm_jax.main "--config=$config" "--workdir=$workdir" "--mode=$mode" "${overrides[@]}" || status=$?
(( status == 0 )) || stop_others
for pid in "${pids[@]}"; do
  wait "$pid" || { rc=$?; (( status )) || status=$rc; stop_others; }
done
exit "$status"
