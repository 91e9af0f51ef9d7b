#!/usr/bin/env bash
# Trains isdaa-jax on a Cloud TPU VM slice: create it, install this checkout on every worker, start
# the same training command on all workers at once, follow the log, stop, delete.
#
# Usage: launch/tpu_vm.sh [--dry-run] SUBCOMMAND [CONFIG OVERRIDES...]
#
#   create   gcloud compute tpus tpu-vm create (or a queued resource with QUEUED=1)
#   setup    copy this checkout (tracked + untracked, not ignored files) to every worker and
#            install it with jax[tpu] in a virtual environment there
#   train    python -m isdaa_jax.main --config=$CONFIG --workdir=gs://... on every worker, in the
#            background; extra arguments are config overrides (--config.loss.name=ipo ...)
#   logs     follow the training log of worker $WORKER
#   stop     stop the training started by `train` on every worker
#   delete   delete the slice (and its queued resource)
#
# Before `create`, plan the slice from this machine (no TPU needed; pip install -e ".[tpu]"):
#   python -m isdaa_jax.plan --config=$CONFIG --topology=$ACCELERATOR_TYPE [--find_batch]
# says whether the step fits the chips' HBM, with which micro-batch, and a roofline pairs/s.
#
# --dry-run (or DRY_RUN=1) prints every command, shell-quoted, instead of running it.
#
# Settings (environment variables):
#   TPU_NAME, ZONE, PROJECT   every subcommand
#   ACCELERATOR_TYPE          create: v4-32, v5litepod-16, v5p-64, v6e-16, ...
#   RUNTIME_VERSION           create: TPU software version; default from the accelerator type
#   QUEUED=1                  create/delete through a queued resource named $QUEUED_RESOURCE
#                             (default: $TPU_NAME)
#   SPOT=1                    create Spot TPU VMs
#   CONFIG                    train: experiment file relative to the repo root (configs/hh.py)
#   BUCKET                    train: gs://bucket[/prefix]; the workdir is $BUCKET/$RUN_NAME
#   RUN_NAME                  train: default: the config's file name without .py
#   WORKDIR                   train: a gs:// path that replaces $BUCKET/$RUN_NAME
#   TRAIN_ENV                 train: NAME=VALUE words set for the run (XLA_FLAGS=..., HF_TOKEN=...)
#   WORKER                    logs: worker index or 'all' (default 0)
#   PYTHON                    setup: interpreter for the environment (default python3.11)
#   JAX_SPEC                  setup: default 'jax[tpu]>=0.10.2,<0.11' (the pin of pyproject.toml)
#
# Every worker must read and write the same workdir, so it is a gs:// path (Orbax and the
# metrics writer open gs:// paths directly; setup installs gcsfs for that).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SCRIPT=launch/tpu_vm.sh
# Paths on the workers: their '~' is expanded by the worker's shell, never here.
# shellcheck disable=SC2088
{
  REMOTE_DIR='~/isdaa-jax'
  REMOTE_VENV='~/isdaa-venv'
  REMOTE_LOG='~/isdaa-train.log'
  REMOTE_PID='~/isdaa-train.pid'
}
REMOTE_TARBALL=isdaa-jax.tar.gz

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

fail() {
  echo "$SCRIPT: $*" >&2
  exit 2
}

# One shell-quoted command line: what --dry-run prints, and how the remote command is built.
quote() {
  local words=() arg
  for arg in "$@"; do
    if [[ $arg =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
      words+=("$arg")
    else
      words+=("'${arg//\'/\'\\\'\'}'")
    fi
  done
  printf '%s\n' "${words[*]}"
}

run() {
  if [[ $DRY_RUN == 1 ]]; then
    quote "$@"
  else
    echo "+ $(quote "$@")" >&2
    "$@"
  fi
}

require() {
  local missing=() name
  for name in "$@"; do
    [[ -n ${!name:-} ]] || missing+=("$name")
  done
  if ((${#missing[@]})); then
    local list
    printf -v list '%s, ' "${missing[@]}"
    fail "$SUBCOMMAND needs ${list%, } set in the environment (see $SCRIPT --help)."
  fi
}

gcloud_tpu_flags() { echo "--zone=$ZONE" "--project=$PROJECT"; }

ssh_workers() {  # ssh_workers WORKER REMOTE_COMMAND
  # shellcheck disable=SC2046  # zone and project hold no spaces
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" $(gcloud_tpu_flags) "--worker=$1" "--command=$2"
}

runtime_version() {
  if [[ -n ${RUNTIME_VERSION:-} ]]; then
    echo "$RUNTIME_VERSION"
    return
  fi
  case $ACCELERATOR_TYPE in
    v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) fail "no default runtime version for ACCELERATOR_TYPE=$ACCELERATOR_TYPE; set RUNTIME_VERSION (gcloud compute tpus versions list --zone=$ZONE)." ;;
  esac
}

cmd_create() {
  require TPU_NAME ZONE PROJECT ACCELERATOR_TYPE
  local version
  version=$(runtime_version) || exit  # fail() inside $(...) only leaves the subshell
  local spot=()
  [[ ${SPOT:-0} == 1 ]] && spot=(--spot)
  if [[ ${QUEUED:-0} == 1 ]]; then
    # shellcheck disable=SC2046
    run gcloud compute tpus queued-resources create "${QUEUED_RESOURCE:-$TPU_NAME}" \
      "--node-id=$TPU_NAME" $(gcloud_tpu_flags) "--accelerator-type=$ACCELERATOR_TYPE" \
      "--runtime-version=$version" ${spot[@]+"${spot[@]}"}
  else
    # shellcheck disable=SC2046
    run gcloud compute tpus tpu-vm create "$TPU_NAME" $(gcloud_tpu_flags) \
      "--accelerator-type=$ACCELERATOR_TYPE" "--version=$version" ${spot[@]+"${spot[@]}"}
  fi
}

cmd_setup() {
  require TPU_NAME ZONE PROJECT
  local tarball=${TMPDIR:-/tmp}/isdaa-jax-$TPU_NAME.tar.gz
  local python=${PYTHON:-python3.11}
  local jax_spec=${JAX_SPEC:-'jax[tpu]>=0.10.2,<0.11'}
  # What runs on the workers is this checkout as it is now, minus what git ignores (runs/, caches).
  local pack
  pack="git -C $(quote "$ROOT") ls-files -z -co --exclude-standard | tar -czf $(quote "$tarball") -C $(quote "$ROOT") --null -T -"
  if [[ $DRY_RUN == 1 ]]; then
    echo "$pack"
  else
    echo "+ $pack" >&2
    bash -o pipefail -c "$pack"
  fi
  # shellcheck disable=SC2046
  run gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:$REMOTE_TARBALL" $(gcloud_tpu_flags) \
    --worker=all
  local steps=(
    'set -e'
    # TPU VM images ship an older system Python; the package needs >= 3.11 with venv support.
    "$(quote "$python") -c 'import ensurepip' 2>/dev/null || { sudo apt-get update -qq && sudo apt-get install -y -qq $(quote "$python") $(quote "$python-venv"); }"
    "$(quote "$python") -m venv $REMOTE_VENV"
    "rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR && tar -xzf ~/$REMOTE_TARBALL -C $REMOTE_DIR"
    "$REMOTE_VENV/bin/python -m pip install -q -U pip"
    "$REMOTE_VENV/bin/python -m pip install -q $(quote "$jax_spec") gcsfs -e $REMOTE_DIR"
    "$REMOTE_VENV/bin/python -c 'import jax; print(jax.process_index(), jax.local_device_count(), jax.device_count())'"
  )
  local joined
  joined=$(printf '%s; ' "${steps[@]}")
  ssh_workers all "${joined%; }"
}

cmd_train() {
  # WORKDIR, when given, stands in for BUCKET.
  require TPU_NAME ZONE PROJECT CONFIG "$([[ -n ${WORKDIR:-} ]] && echo WORKDIR || echo BUCKET)"
  [[ -f $ROOT/${CONFIG%%:*} ]] ||
    fail "CONFIG=$CONFIG is not a file under $ROOT; give the experiment file relative to the repo root, e.g. configs/hh.py."
  local run_name config_file=${CONFIG%%:*}
  run_name=${RUN_NAME:-$(basename "$config_file" .py)}
  local bucket=${BUCKET:-}
  [[ -z $bucket || $bucket == gs://* ]] || bucket=gs://$bucket
  local workdir=${WORKDIR:-${bucket%/}/$run_name}
  [[ $workdir == gs://* ]] ||
    fail "WORKDIR=$workdir is not a gs:// path; every worker must write to the same bucket."
  local env_words=() prefix=''
  read -r -a env_words <<<"${TRAIN_ENV:-}"
  ((${#env_words[@]} == 0)) || prefix="$(quote env "${env_words[@]}") "
  # The venv path stays unquoted so that the remote shell expands its '~'.
  local command
  command="$prefix$REMOTE_VENV/bin/python $(quote -m isdaa_jax.main "--config=$CONFIG" \
    "--workdir=$workdir" "$@")"
  local steps=(
    'set -e'
    "if [ -f $REMOTE_PID ] && kill -0 \"\$(cat $REMOTE_PID)\" 2>/dev/null; then echo \"training already runs on \$(hostname); $SCRIPT stop first\" >&2; exit 1; fi"
    "cd $REMOTE_DIR"
    # nohup and closed stdin let the run outlive this ssh session; `logs` follows the file.
    "nohup $command > $REMOTE_LOG 2>&1 < /dev/null & echo \$! > $REMOTE_PID"
    "echo \"started on \$(hostname): $REMOTE_LOG\""
  )
  local joined
  joined=$(printf '%s; ' "${steps[@]}")
  ssh_workers all "${joined%; }"
}

cmd_logs() {
  require TPU_NAME ZONE PROJECT
  ssh_workers "${WORKER:-0}" "tail -n 200 -F $REMOTE_LOG"
}

cmd_stop() {
  require TPU_NAME ZONE PROJECT
  ssh_workers all "if [ -f $REMOTE_PID ]; then kill \"\$(cat $REMOTE_PID)\" 2>/dev/null || true; rm -f $REMOTE_PID; fi"
}

cmd_delete() {
  require TPU_NAME ZONE PROJECT
  if [[ ${QUEUED:-0} == 1 ]]; then
    # --force deletes the slice the queued resource holds along with it.
    # shellcheck disable=SC2046
    run gcloud compute tpus queued-resources delete "${QUEUED_RESOURCE:-$TPU_NAME}" \
      $(gcloud_tpu_flags) --force --quiet
  else
    # shellcheck disable=SC2046
    run gcloud compute tpus tpu-vm delete "$TPU_NAME" $(gcloud_tpu_flags) --quiet
  fi
}

DRY_RUN=${DRY_RUN:-0}
SUBCOMMAND=''
ARGS=()
for arg in "$@"; do
  if [[ $arg == --dry-run ]]; then
    DRY_RUN=1
  elif [[ -z $SUBCOMMAND && ($arg == -h || $arg == --help) ]]; then
    usage
    exit 0
  elif [[ -z $SUBCOMMAND ]]; then
    SUBCOMMAND=$arg
  else
    ARGS+=("$arg")
  fi
done

case $SUBCOMMAND in
  create | setup | logs | stop | delete)
    ((${#ARGS[@]} == 0)) || fail "$SUBCOMMAND takes no arguments (got: $(quote "${ARGS[@]}")); only train passes config overrides."
    "cmd_$SUBCOMMAND"
    ;;
  train) cmd_train ${ARGS[@]+"${ARGS[@]}"} ;;
  '') fail "give a subcommand: create, setup, train, logs, stop or delete (see $SCRIPT --help)." ;;
  *) fail "unknown subcommand '$SUBCOMMAND'; use create, setup, train, logs, stop or delete." ;;
esac
