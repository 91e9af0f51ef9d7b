#!/usr/bin/env bash
# Trains isdaa-jax on one machine with one or more GPUs: a single JAX process drives every local
# GPU (the mesh spreads over all of them), so no jax.distributed start-up is needed.
#
# Usage: CONFIG=configs/hh.py WORKDIR=runs/hh launch/gpu_single_host.sh [--dry-run] [CONFIG OVERRIDES...]
#   e.g. ... launch/gpu_single_host.sh --config.loss.name=ipo '--config.data.length_buckets=(256, 512)'
#
# --dry-run (or DRY_RUN=1) prints the command, shell-quoted, instead of running it.
#
# Settings (environment variables):
#   CONFIG    experiment file (configs/hh.py, or configs/hh.py:ARG)        required
#   WORKDIR   checkpoints and metrics (a local folder or gs://...)         required
#   GPUS      comma-separated GPU ids for CUDA_VISIBLE_DEVICES (default: every visible GPU)
#   PYTHON    interpreter with isdaa-jax and jax[cuda12] installed (default python3)
set -euo pipefail

SCRIPT=launch/gpu_single_host.sh

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

fail() {
  echo "$SCRIPT: $*" >&2
  exit 2
}

# One shell-quoted command line, as --dry-run prints it.
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

DRY_RUN=${DRY_RUN:-0}
OVERRIDES=()
for arg in "$@"; do
  case $arg in
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    *) OVERRIDES+=("$arg") ;;
  esac
done

missing=()
[[ -n ${CONFIG:-} ]] || missing+=(CONFIG)
[[ -n ${WORKDIR:-} ]] || missing+=(WORKDIR)
if ((${#missing[@]})); then
  printf -v list '%s, ' "${missing[@]}"
  fail "set ${list%, } in the environment, e.g. CONFIG=configs/hh.py WORKDIR=runs/hh $SCRIPT"
fi
[[ -f ${CONFIG%%:*} ]] || fail "CONFIG=$CONFIG is not a file (relative to $(pwd)); run from the repo root or give its path."

command=()
[[ -z ${GPUS:-} ]] || command+=(env "CUDA_VISIBLE_DEVICES=$GPUS")
# One process owns every GPU of the host; 'off' keeps a SLURM or cloud environment from
# triggering a multi-process start-up.
command+=("${PYTHON:-python3}" -m isdaa_jax.main "--config=$CONFIG" "--workdir=$WORKDIR"
  --config.distributed.initialize=off ${OVERRIDES[@]+"${OVERRIDES[@]}"})

if [[ $DRY_RUN == 1 ]]; then
  quote "${command[@]}"
else
  echo "+ $(quote "${command[@]}")" >&2
  exec "${command[@]}"
fi
