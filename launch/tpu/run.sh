#!/usr/bin/env bash
# Cloud TPU launcher: create a TPU VM / queued resource (single host, pod slice,
# multislice), install ldm_jax on every worker, run training on --worker=all, tear down.
#   launch/tpu/run.sh all --name=dit --zone=us-east5-a --accelerator-type=v5p-8 \
#       --copy --config=configs/quickstart.py:dit --workdir=/gcs/bucket/runs/dit --teardown
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo_root=$(cd "$here/../.." && pwd)
# shellcheck source=launch/common.sh
source "$here/../common.sh"

VALID_OPTIONS="--name, --zone, --project, --accelerator-type, --runtime-version, --queued, --spot, --num-slices N, --repo-url URL, --branch B, --copy, --config, --workdir, --mode, --remote-dir, --python, --pip-extra, --detach, --teardown, --dry-run, --help, -- OVERRIDES..."
SUBCOMMANDS="create setup run logs delete all"

usage() {
  cat <<USAGE
usage: launch/tpu/run.sh SUBCOMMAND --name=NAME --zone=ZONE [options] [-- OVERRIDES...]

subcommands:
  create   gcloud compute tpus tpu-vm create (or queued-resources create with --queued)
  setup    put the project on all workers (--copy or --repo-url) and install it:
           python venv + pip install -c constraints.txt -e . (+ --pip-extra)
  run      python -m ldm_jax.main --config=... --workdir=... OVERRIDES on --worker=all,
           output streamed here and appended to REMOTE_DIR/run.log on every worker
  logs     follow REMOTE_DIR/run.log of worker 0 (after run --detach)
  delete   delete the TPU VM / queued resource
  all      create, setup, run, and delete too when --teardown is given

options:
  --name NAME               TPU / queued resource name (required)
  --zone ZONE               e.g. us-east5-a (required)
  --project P               gcloud project (default: gcloud's configured one)
  --accelerator-type T      e.g. v5p-8, v5litepod-16, v6e-8 (required for create)
  --runtime-version V       TPU software version (default chosen from the type:
                            v5p v2-alpha-tpuv5, v5litepod v2-alpha-tpuv5-lite,
                            v6e v2-alpha-tpuv6e, others tpu-ubuntu2204-base)
  --queued                  use queued resources (waits until ACTIVE)
  --spot                    spot capacity
  --num-slices N            multislice: N slices through queued resources (--node-count;
                            implies --queued; nodes are NAME-0..NAME-{N-1})
  --repo-url URL [--branch B]  setup clones the repository on every worker
  --copy                    setup copies this working tree (tar + scp) to every worker
  --config C                config file[:preset] (required for run)
  --workdir W               workdir on the workers, e.g. /gcs/bucket/runs/x (required for run)
  --mode M                  train (default), sample or bpd
  --remote-dir D            project folder on the workers (default ldm_jax)
  --python P                interpreter for the venv on the workers (default python3;
                            the project wants Python 3.11)
  --pip-extra SPEC          extra package for TPUs (default 'jax[tpu]'; '' for none)
  --detach                  run in the background on the workers (then use 'logs')
  --teardown                with 'all': delete when the run ends (also after a failure)
  --dry-run                 print every command, one a line, run nothing
  --help                    this text
USAGE
}

subcommand="" name="" zone="" project="" accel="" runtime="" queued=0 spot=0 slices=1
repo_url="" branch="" copy=0 config="" workdir="" mode=train remote_dir=ldm_jax python=python3
pip_extra='jax[tpu]' detach=0 teardown=0
overrides=()
while (( $# )); do
  if [[ $1 == --*=* ]]; then set -- "${1%%=*}" "${1#*=}" "${@:2}"; fi
  case $1 in
    --name) need_value "$1" $#; name=$2; shift 2 ;;
    --zone) need_value "$1" $#; zone=$2; shift 2 ;;
    --project) need_value "$1" $#; project=$2; shift 2 ;;
    --accelerator-type) need_value "$1" $#; accel=$2; shift 2 ;;
    --runtime-version) need_value "$1" $#; runtime=$2; shift 2 ;;
    --queued) queued=1; shift ;;
    --spot) spot=1; shift ;;
    --num-slices) need_value "$1" $#; slices=$2; shift 2 ;;
    --repo-url) need_value "$1" $#; repo_url=$2; shift 2 ;;
    --branch) need_value "$1" $#; branch=$2; shift 2 ;;
    --copy) copy=1; shift ;;
    --config) need_value "$1" $#; config=$2; shift 2 ;;
    --workdir) need_value "$1" $#; workdir=$2; shift 2 ;;
    --mode) need_value "$1" $#; mode=$2; shift 2 ;;
    --remote-dir) need_value "$1" $#; remote_dir=$2; shift 2 ;;
    --python) need_value "$1" $#; python=$2; shift 2 ;;
    --pip-extra) need_value "$1" $#; pip_extra=$2; shift 2 ;;
    --detach) detach=1; shift ;;
    --teardown) teardown=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; overrides=("$@"); break ;;
    -*) fail_usage "unknown option $1" ;;
    *)
      [[ -z $subcommand ]] || fail_usage "unexpected argument $1 (subcommand already '$subcommand')"
      [[ " $SUBCOMMANDS " == *" $1 "* ]] || { VALID_OPTIONS="subcommands: $SUBCOMMANDS"; fail_usage "unknown subcommand $1"; }
      subcommand=$1; shift ;;
  esac
done
[[ -n $subcommand ]] || { VALID_OPTIONS="subcommands: $SUBCOMMANDS"; fail_usage "missing subcommand"; }
require "$name" --name
require "$zone" --zone
[[ $slices =~ ^[1-9][0-9]*$ ]] || fail_usage "--num-slices must be a positive integer, got '$slices'"
(( slices == 1 )) || queued=1
case $mode in train|sample|bpd) ;; *) fail_usage "unknown --mode '$mode' (train, sample, bpd)" ;; esac
needs() { [[ $subcommand == "$1" || $subcommand == all ]]; }
if needs create; then require "$accel" --accelerator-type; fi
if needs setup; then
  (( copy )) || [[ -n $repo_url ]] || fail_usage "missing required option --copy or --repo-url"
  (( copy )) && [[ -n $repo_url ]] && fail_usage "give one of --copy and --repo-url"
fi
if needs run; then require "$config" --config; require "$workdir" --workdir; fi
if [[ -z $runtime ]]; then
  case $accel in
    v5p-*) runtime=v2-alpha-tpuv5 ;;
    v5litepod-*) runtime=v2-alpha-tpuv5-lite ;;
    v6e-*) runtime=v2-alpha-tpuv6e ;;
    *) runtime=tpu-ubuntu2204-base ;;
  esac
fi

where=("--zone=$zone")
[[ -z $project ]] || where+=("--project=$project")
# The TPU VM names that ssh/scp address: one, or NAME-0..NAME-{N-1} for multislice.
nodes=()
if (( slices == 1 )); then nodes=("$name"); else
  for (( i = 0; i < slices; i++ )); do nodes+=("$name-$i"); done
fi

q() { shell_quote "$1"; }

create() {
  local extra=()
  (( spot )) && extra+=(--spot)
  if (( queued )); then
    if (( slices == 1 )); then extra+=("--node-id=$name"); else
      extra+=("--node-count=$slices" "--node-prefix=$name"); fi
    run gcloud compute tpus queued-resources create "$name" "${where[@]}" \
      "--accelerator-type=$accel" "--runtime-version=$runtime" "${extra[@]}"
    wait_active
  else
    run gcloud compute tpus tpu-vm create "$name" "${where[@]}" \
      "--accelerator-type=$accel" "--version=$runtime" "${extra[@]}"
  fi
}

wait_active() {
  local describe=(gcloud compute tpus queued-resources describe "$name" "${where[@]}" '--format=value(state.state)')
  if (( DRY_RUN )); then run "${describe[@]}"; return; fi
  local state
  while state=$("${describe[@]}"); [[ $state != ACTIVE ]]; do
    case $state in FAILED|SUSPENDED) echo "error: queued resource $name is $state" >&2; exit 1 ;; esac
    echo "queued resource $name: ${state:-unknown}; waiting" >&2
    sleep 30
  done
}

# ssh_all COMMAND: COMMAND on every worker of every node (slices in parallel).
ssh_all() {
  local node pids=() status=0
  if (( ${#nodes[@]} == 1 )); then
    run gcloud compute tpus tpu-vm ssh "${nodes[0]}" "${where[@]}" --worker=all "--command=$1"
    return
  fi
  if (( DRY_RUN )); then
    for node in "${nodes[@]}"; do
      printf '%s &\n' "$(command_line gcloud compute tpus tpu-vm ssh "$node" "${where[@]}" --worker=all "--command=$1")"
    done
    echo wait
    return
  fi
  for node in "${nodes[@]}"; do
    gcloud compute tpus tpu-vm ssh "$node" "${where[@]}" --worker=all "--command=$1" &
    pids+=("$!")
  done
  for node in "${pids[@]}"; do wait "$node" || status=$?; done
  return "$status"
}

setup() {
  local dir install
  dir=$(q "$remote_dir")
  install="cd $dir && $(q "$python") -m venv .venv && . .venv/bin/activate && pip install -U pip"
  install+=" && pip install -c constraints.txt -e ."
  [[ -z $pip_extra ]] || install+=" $(q "$pip_extra")"
  if (( copy )); then
    local tarball="/tmp/ldm_jax-$name.tar.gz" node
    run tar -czf "$tarball" --exclude-vcs --exclude=./.venv --exclude=./venv --exclude=./runs \
      --exclude=__pycache__ --exclude='*.egg-info' -C "$repo_root" .
    for node in "${nodes[@]}"; do
      run gcloud compute tpus tpu-vm scp "$tarball" "$node:ldm_jax.tar.gz" "${where[@]}" --worker=all
    done
    ssh_all "mkdir -p $dir && tar -xzf ldm_jax.tar.gz -C $dir && $install"
  else
    local clone=(git clone)
    [[ -z $branch ]] || clone+=(--branch "$branch")
    ssh_all "(test -d $dir/.git && git -C $dir pull --ff-only || $(command_line "${clone[@]}" "$repo_url" "$remote_dir")) && $install"
  fi
}

train_command() {
  local cmd
  # LDM_JAX_DISTRIBUTED=auto: every worker joins one run (jax.distributed.initialize()).
  cmd=$(command_line env LDM_JAX_DISTRIBUTED=auto python -m ldm_jax.main "--config=$config" "--workdir=$workdir" "--mode=$mode" "${overrides[@]}")
  if (( detach )); then
    echo "cd $(q "$remote_dir") && . .venv/bin/activate && nohup $cmd >> run.log 2>&1 < /dev/null &"
  else
    echo "cd $(q "$remote_dir") && . .venv/bin/activate && set -o pipefail && $cmd 2>&1 | tee -a run.log"
  fi
}

train() { ssh_all "$(train_command)"; }

logs() {
  run gcloud compute tpus tpu-vm ssh "${nodes[0]}" "${where[@]}" --worker=0 \
    "--command=tail -n +1 -F $(q "$remote_dir")/run.log"
}

delete() {
  if (( queued )); then
    run gcloud compute tpus queued-resources delete "$name" "${where[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$name" "${where[@]}" --quiet
  fi
}

case $subcommand in
  create) create ;;
  setup) setup ;;
  run) train ;;
  logs) logs ;;
  delete) delete ;;
  all)
    create
    if (( teardown )); then
      status=0
      { setup && train; } || status=$?
      delete
      exit "$status"
    fi
    setup
    train ;;
esac
