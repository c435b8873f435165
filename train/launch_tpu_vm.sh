#!/usr/bin/env bash
# Runs `python -m train` on every host of a Cloud TPU VM pod (one process per host, all started at once).
#
#   train/launch_tpu_vm.sh --name NAME --zone ZONE --config CONFIG[:ARG] --workdir DIR [options] [-- TRAIN_FLAGS...]
#
# Every host runs the same command with --distributed=on: on a TPU VM, jax.distributed.initialize() learns
# the coordinator and the process ids from the TPU runtime, so no addresses are passed. WORKDIR must be the
# same storage for every host (a gs:// bucket, or a filesystem mounted on all of them): each host writes
# its own checkpoint shards and iterator state there, and all of them read the previous stage's export.
#
# Options (the environment variable in brackets is the default when the option is absent):
#   --name NAME          TPU VM name                                              [TPU_NAME]
#   --zone ZONE          its zone, e.g. us-central2-b                             [TPU_ZONE]
#   --project PROJECT    GCP project; default: gcloud's configured project        [TPU_PROJECT]
#   --config PATH[:ARG]  experiment config, relative to the repository, e.g.
#                        configs/stage2_video_pretrain.py:prev=gs://bucket/stage1,data=gs://bucket/records
#   --workdir DIR        checkpoints, TensorBoard events, summary.json and the export (gs://... or shared)
#   --repo-dir DIR       the repository on the hosts; default ~/kangaroo-jax     [TPU_REPO_DIR]
#   --python PY          interpreter for --setup (the package needs 3.11); default python3.11
#   --sync               first copy this checkout's committed HEAD (git archive) into --repo-dir on every host
#   --setup              first create REPO_DIR/.venv on every host and install the package with jax[tpu]
#   --env KEY=VALUE      exported on every host before training; repeatable (e.g. LIBTPU_INIT_ARGS=...)
#   --detach             run under nohup (logs: REPO_DIR/logs/train-HOSTNAME.log) and return at once; without
#                        it the output of all hosts streams here and the script ends with the run
#   --dry-run            print the commands instead of running them (gcloud is not needed)
#   -h, --help           this text
# Everything after `--` goes to `python -m train` unchanged, e.g. -- --config.optim.lr=1e-4 --stop_after=1000.
#
# Exit status: 2 for a usage error, otherwise that of the failing gcloud command (0 when all succeeded).

set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
  sed -n '2,/^$/p' "${BASH_SOURCE[0]}" | sed -e 's/^# \{0,1\}//' -e '/^set -euo/d'
}

die() {  # usage error: message, a pointer to --help, status 2
  echo "launch_tpu_vm.sh: error: $*" >&2
  echo "run 'train/launch_tpu_vm.sh --help' for usage" >&2
  exit 2
}

NAME="${TPU_NAME:-}"
ZONE="${TPU_ZONE:-}"
PROJECT="${TPU_PROJECT:-}"
REPO_DIR="${TPU_REPO_DIR:-~/kangaroo-jax}"
PYTHON=python3.11
CONFIG=""
WORKDIR=""
SYNC=0
SETUP=0
DETACH=0
DRY_RUN=0
ENVS=()
TRAIN_ARGS=()

while (($#)); do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --sync) SYNC=1 ;;
    --setup) SETUP=1 ;;
    --detach) DETACH=1 ;;
    --dry-run) DRY_RUN=1 ;;
    --) shift; TRAIN_ARGS=("$@"); break ;;
    --name|--zone|--project|--config|--workdir|--repo-dir|--python|--env)
      (($# >= 2)) && [[ -n "$2" && "$2" != --* ]] || die "$1 needs a value"
      case "$1" in
        --name) NAME="$2" ;;
        --zone) ZONE="$2" ;;
        --project) PROJECT="$2" ;;
        --config) CONFIG="$2" ;;
        --workdir) WORKDIR="$2" ;;
        --repo-dir) REPO_DIR="$2" ;;
        --python) PYTHON="$2" ;;
        --env) ENVS+=("$2") ;;
      esac
      shift ;;
    --*=*) die "write '${1%%=*} ${1#*=}' (option and value as two words)" ;;
    *) die "unknown argument '$1'" ;;
  esac
  shift
done

[[ -n "$NAME" ]] || die "--name is required (or set TPU_NAME)"
[[ -n "$ZONE" ]] || die "--zone is required (or set TPU_ZONE)"
[[ -n "$CONFIG" ]] || die "--config is required"
[[ -n "$WORKDIR" ]] || die "--workdir is required"
[[ "$NAME" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die "--name '$NAME' is not a TPU name (lowercase letters, digits, '-')"
[[ "$ZONE" =~ ^[a-z]+-[a-z]+[0-9]+-[a-z]$ ]] || die "--zone '$ZONE' does not look like a zone (e.g. us-central2-b)"
CONFIG_FILE="${CONFIG%%:*}"
[[ "$CONFIG_FILE" != /* ]] || die "--config '$CONFIG_FILE' must be relative to the repository (it is read on the hosts)"
[[ -f "$ROOT/$CONFIG_FILE" ]] || die "--config '$CONFIG_FILE' not found in $ROOT"
# A relative workdir would resolve to a different local disk on every host.
[[ "$WORKDIR" == gs://* || "$WORKDIR" == /* ]] || die "--workdir '$WORKDIR' must be gs://... or an absolute shared path"
for kv in ${ENVS[@]+"${ENVS[@]}"}; do
  [[ "$kv" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env '$kv' is not KEY=VALUE"
done
for a in ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}; do
  case "$a" in
    --config|--config=*|--workdir|--workdir=*|--distributed*|--coordinator_address*|--num_processes*|--process_id*)
      die "'$a' after -- is set by this script (use --config / --workdir; the TPU runtime gives the process ids)" ;;
  esac
done
if [[ "$WORKDIR" != gs://* ]]; then
  echo "launch_tpu_vm.sh: note: --workdir $WORKDIR must be one filesystem mounted on every host" >&2
fi

q() {  # shell-quotes each argument (single quotes where needed, so the dry run stays readable), joined by spaces
  local out=() a
  for a in "$@"; do
    if [[ "$a" =~ ^[-A-Za-z0-9_./:=,@%+]+$ ]]; then
      out+=("$a")
    else
      out+=("'${a//\'/\'\\\'\'}'")
    fi
  done
  echo "${out[*]}"
}

# "~/x" must expand on the host, so only the part after "~/" is quoted.
if [[ "$REPO_DIR" == "~/"* ]]; then
  REPO="\"\$HOME\"/$(q "${REPO_DIR#\~/}")"
else
  REPO="$(q "$REPO_DIR")"
fi

GCLOUD_WHERE=(--zone "$ZONE" --worker=all)
[[ -z "$PROJECT" ]] || GCLOUD_WHERE+=(--project "$PROJECT")

run() {  # prints the command, shell-quoted, and runs it unless --dry-run
  if ((DRY_RUN)); then
    q "$@"
  else
    echo "+ $(q "$@")" >&2
    "$@"
  fi
}

on_all_hosts() {
  run gcloud compute tpus tpu-vm ssh "$NAME" "${GCLOUD_WHERE[@]}" --command="$1"
}

if ((!DRY_RUN)) && ! command -v gcloud >/dev/null; then
  echo "launch_tpu_vm.sh: error: gcloud not found on PATH (install the Google Cloud CLI, or use --dry-run)" >&2
  exit 127
fi

if ((SYNC)); then
  TARBALL="${TMPDIR:-/tmp}/kangaroo-jax-$$.tar.gz"
  run git -C "$ROOT" archive --format=tar.gz -o "$TARBALL" HEAD
  run gcloud compute tpus tpu-vm scp "$TARBALL" "$NAME:/tmp/kangaroo-jax.tar.gz" "${GCLOUD_WHERE[@]}"
  on_all_hosts "mkdir -p $REPO && tar -xzf /tmp/kangaroo-jax.tar.gz -C $REPO && rm /tmp/kangaroo-jax.tar.gz"
  ((DRY_RUN)) || rm -f "$TARBALL"
fi

if ((SETUP)); then
  # jax[tpu] pulls the libtpu matching the jax version that setup.cfg pins.
  on_all_hosts "cd $REPO && { test -x .venv/bin/python || $(q "$PYTHON") -m venv .venv; } && \
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel && \
.venv/bin/python -m pip install -q -e . 'jax[tpu]'"
fi

EXPORTS=""
for kv in ${ENVS[@]+"${ENVS[@]}"}; do
  EXPORTS+="export ${kv%%=*}=$(q "${kv#*=}") && "
done
TRAIN="$(q .venv/bin/python -m train --config "$CONFIG" --workdir "$WORKDIR" --distributed=on \
  ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"})"
if ((DETACH)); then
  on_all_hosts "cd $REPO && ${EXPORTS}mkdir -p logs && nohup $TRAIN > logs/train-\$(hostname).log 2>&1 < /dev/null &"
else
  on_all_hosts "cd $REPO && ${EXPORTS}$TRAIN"
fi
