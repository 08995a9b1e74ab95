#!/usr/bin/env bash
# The main job on the embedded default data (scikit-learn digits): MAE teacher -> TinyMIM student ->
# fine-tune, against an MAE-from-scratch baseline, plus floors and segmentation. ~8 minutes on 2 idle CPU cores (plus the first install).
# Extra args go to the demo (e.g. --workdir DIR). A rerun skips finished stages and resumes an interrupted one.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh core
export TF_CPP_MIN_LOG_LEVEL=2 HF_HUB_OFFLINE=1
exec .venv/bin/python -m tinymim_jax.demo "$@"
