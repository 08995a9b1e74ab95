#!/bin/bash
# Runs tinymim_jax on every worker of a Cloud TPU VM (pod slice) through `gcloud ... ssh --worker=all`.
#
# Usage:
#   export TPU=my-v4-32 ZONE=us-central2-b [PROJECT=my-project]
#   launch/tpu_pod.sh setup [REPO_URL] [BRANCH]   # on all workers: clone (or pull) ~/tinymim-jax, make .venv,
#                                                 # pip install -e . and jax[tpu]
#   launch/tpu_pod.sh run --config configs/X.py:arg --workdir DIR [--config.field=value ...]
#                                                 # same command on all workers, output streamed here
#   launch/tpu_pod.sh run_bg --config ...         # same, detached (nohup): survives a dropped ssh; logs to
#                                                 # ~/tinymim-jax/logs/<time>.log on each worker
#   launch/tpu_pod.sh tail                        # follow worker 0's latest log
#   launch/tpu_pod.sh stop                        # SIGTERM: every worker saves a checkpoint and exits (rerun `run` to resume)
#   launch/tpu_pod.sh ssh 'any command'           # run a command on all workers
#
# Every worker runs the identical command. jax detects the pod on its own: tinymim_jax.sharding's
# initialize_distributed() sees TPU_WORKER_HOSTNAMES and jax.distributed.initialize() reads the worker id,
# the process count and the coordinator (worker 0) from the TPU VM metadata; there is nothing to pass.
# A run only starts when all workers have joined, and a process left over from an earlier run holds the
# chips ("TPU in use"): use `stop` first.
#
# DIR must be the same path on every worker and point at storage that all of them share for checkpoints
# (e.g. a mounted filesystem; tinymim_jax.writers needs a local or mounted path for metrics.jsonl).
set -euo pipefail

: "${TPU:?set TPU to the TPU VM name}"
: "${ZONE:?set ZONE to the TPU zone}"
REMOTE_DIR="${REMOTE_DIR:-~/tinymim-jax}"

gssh() {
  # --worker=all: the same command on every host of the slice, in parallel.
  gcloud compute tpus tpu-vm ssh "${TPU}" --zone "${ZONE}" ${PROJECT:+--project "${PROJECT}"} \
    --worker=all --command "$1"
}

quote() { printf '%q ' "$@"; }

cmd="${1:-}"
shift || true
case "${cmd}" in
  setup)
    repo="${1:-$(git config --get remote.origin.url)}"
    branch="${2:-main}"
    gssh "set -e
      if [ -d ${REMOTE_DIR}/.git ]; then cd ${REMOTE_DIR} && git fetch -q && git checkout -q $(quote "${branch}") && git pull -q;
      else git clone -q -b $(quote "${branch}") $(quote "${repo}") ${REMOTE_DIR} && cd ${REMOTE_DIR}; fi
      python3 -m venv .venv
      .venv/bin/pip install -q -U pip
      .venv/bin/pip install -q -e .
      .venv/bin/pip install -q -U 'jax[tpu]'
      .venv/bin/python -c 'import jax; print(jax.process_index(), jax.local_device_count(), jax.device_count())'"
    ;;
  run)
    gssh "cd ${REMOTE_DIR} && TINYMIM_DISTRIBUTED=1 .venv/bin/python -m tinymim_jax.main $(quote "$@")"
    ;;
  run_bg)
    log="logs/$(date +%Y%m%d-%H%M%S).log"
    gssh "cd ${REMOTE_DIR} && mkdir -p logs && TINYMIM_DISTRIBUTED=1 nohup .venv/bin/python -m tinymim_jax.main $(quote "$@") \
      > ${log} 2>&1 < /dev/null & echo \$(hostname): ${REMOTE_DIR}/${log}"
    ;;
  tail)
    gcloud compute tpus tpu-vm ssh "${TPU}" --zone "${ZONE}" ${PROJECT:+--project "${PROJECT}"} --worker=0 \
      --command "cd ${REMOTE_DIR} && tail -F \$(ls -t logs/*.log | head -1)"
    ;;
  stop)
    gssh "pkill -TERM -f 'python -m tinymim_jax.main' || true; sleep 60; pkill -KILL -f 'python -m tinymim_jax.main' || true"
    ;;
  ssh)
    gssh "$*"
    ;;
  *)
    sed -n '2,27p' "$0" >&2
    exit 2
    ;;
esac
