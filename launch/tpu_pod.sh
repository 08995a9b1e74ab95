#!/bin/bash
# Runs tinymim_jax on every worker of a Cloud TPU VM (pod slice) through `gcloud ... ssh --worker=all`.
#
# Usage:
#   export TPU=my-v4-32 ZONE=us-central2-b [PROJECT=my-project]
#   launch/tpu_pod.sh setup [REPO_URL] [BRANCH]   # on all workers: clone (or pull) ~/tinymim-jax, make .venv,
#                                                 # pip install -e . and jax[tpu]
#   launch/tpu_pod.sh run --config configs/X.py:arg --workdir DIR [--config.field=value ...]
#                                                 # same command on all workers, output streamed here; exits
#                                                 # 75 if the run stopped after saving (SIGTERM: `stop`, a
#                                                 # maintenance event): run it again to resume
#   launch/tpu_pod.sh run_bg --config ...         # same, detached (nohup): survives a dropped ssh; logs to
#                                                 # ~/tinymim-jax/logs/<time>.log on each worker
#   launch/tpu_pod.sh tail                        # follow worker 0's latest log
#   launch/tpu_pod.sh stop                        # SIGTERM: every worker saves a checkpoint and exits 75
#                                                 # (rerun `run` to resume)
#   launch/tpu_pod.sh ssh 'any command'           # run a command on all workers
#
# Every worker runs the identical command. jax detects the pod on its own: tinymim_jax.sharding's
# initialize_distributed() sees TPU_WORKER_HOSTNAMES and jax.distributed.initialize() reads the worker id,
# the process count and the coordinator (worker 0) from the TPU VM metadata; there is nothing to pass.
# A run only starts when all workers have joined, and a process left over from an earlier run holds the
# chips ("TPU in use"): use `stop` first.
#
# DIR must be the same path on every worker and point at storage that all of them share: a gs:// URI (e.g.
# --workdir gs://my-bucket/wd/run, and teachers / TFDS data there too; credentials: the TPU VM's service account)
# or a mounted filesystem. README.md, "Cloud storage (gs://)", says what differs on an object store.
set -euo pipefail

: "${TPU:?set TPU to the TPU VM name}"
: "${ZONE:?set ZONE to the TPU zone}"
REMOTE_DIR="${REMOTE_DIR:-~/tinymim-jax}"
PREEMPTED=75  # tinymim_jax.main.EXIT_PREEMPTED: the run saved a checkpoint and needs a rerun

gssh() {
  # --worker=all: the same command on every host of the slice, in parallel.
  gcloud compute tpus tpu-vm ssh "${TPU}" --zone "${ZONE}" ${PROJECT:+--project "${PROJECT}"} \
    --worker=all --command "$1"
}

quote() { printf '%q ' "$@"; }

# The run's status from the workers' "tinymim exit status N" lines: the first failure, else 75 if any worker
# stopped after saving, else 0.
pod_status() {
  local s saved=0
  for s in $(grep -oE 'tinymim exit status [0-9]+' "$1" | awk '{print $NF}'); do
    case "${s}" in
      0) ;;
      "${PREEMPTED}") saved=1 ;;
      *) echo "${s}"; return ;;
    esac
  done
  if (( saved )); then echo "${PREEMPTED}"; else echo 0; fi
}

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
      .venv/bin/pip install -q -e '.[gcs]'
      .venv/bin/pip install -q -U 'jax[tpu]'
      .venv/bin/python -c 'import jax; print(jax.process_index(), jax.local_device_count(), jax.device_count())'"
    ;;
  run)
    # Exit status 75 (tinymim_jax.main.EXIT_PREEMPTED): saved, needs a rerun. With --worker=all, gcloud's own
    # status does not say how each worker ended, so each prints its status and pod_status reads them back.
    out="$(mktemp)"
    set +e
    gssh "cd ${REMOTE_DIR} && TINYMIM_DISTRIBUTED=1 .venv/bin/python -m tinymim_jax.main $(quote "$@");
      rc=\$?; echo \"\$(hostname): tinymim exit status \${rc}\"; exit \${rc}" 2>&1 | tee "${out}"
    rc=${PIPESTATUS[0]}
    set -e
    status="$(pod_status "${out}")"
    rm -f "${out}"
    if [[ "${status}" == "${PREEMPTED}" ]]; then
      echo "stopped after saving a checkpoint (exit status ${PREEMPTED}): rerun the same command to resume" >&2
      rc=${PREEMPTED}
    elif [[ "${status}" != 0 ]]; then
      rc=${status}
    fi
    exit "${rc}"
    ;;
  run_bg)
    log="logs/$(date +%Y%m%d-%H%M%S).log"
    gssh "cd ${REMOTE_DIR} && mkdir -p logs && (TINYMIM_DISTRIBUTED=1 nohup .venv/bin/python -m tinymim_jax.main \
      $(quote "$@"); echo \"tinymim exit status \$? (${PREEMPTED}: saved, rerun to resume)\") \
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
    awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0" >&2
    exit 2
    ;;
esac
