#!/usr/bin/env bash
# The GPU check (scripts/device_check.py has the steps): one short run that proves the GPU path.
#
#   bash scripts/device_check.sh                # a GPU machine: under 8 minutes, results in $OUT (or runs/device-check)
#   bash scripts/device_check.sh --device cpu   # the same steps, small, on a CPU (CI runs this form)
#
# The GPU machines lent here have Python 3.12, a CUDA build of torch, transformers, peft,
# safetensors, tokenizers and tensorboard, and no package index. What else the project
# needs comes as wheels fetched beforehand on a machine with an index
# (`bash scripts/fetch_device_wheels.sh`, into .device_wheels/, which the device tool carries);
# they are installed here without an index when the machine lacks them. The project itself
# is imported from the checkout (no install, so no build backend is needed).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# What the project imports at run time, beyond torch and transformers: import name -> wheel.
needed=(gymnasium:gymnasium stable_baselines3:stable-baselines3 sb3_contrib:sb3-contrib
        vaderSentiment:vaderSentiment peft:peft safetensors:safetensors tensorboard:tensorboard
        tqdm:tqdm rich:rich matplotlib:matplotlib pytest:pytest)
missing=()
for pair in "${needed[@]}"; do
    python -c "import ${pair%%:*}" 2>/dev/null || missing+=("${pair##*:}")
done
if ((${#missing[@]})); then
    if [[ -d .device_wheels ]]; then
        echo "installing from .device_wheels/: ${missing[*]}" >&2
        python -m pip install --quiet --no-index --find-links .device_wheels "${missing[@]}"
    else
        echo "missing: ${missing[*]}. Fix: bash scripts/fetch_device_wheels.sh where there is a package index," \
             "and carry .device_wheels/ to this machine (or pip install them)." >&2
        exit 2
    fi
fi
# transformers older than the project's lowest (the lent machines' image had 5.17): the wheel
# fetch_device_wheels.sh took at that version, when it is there (else the check below says so).
lowest=$(sed -n 's/^ *"transformers>=\([0-9.]*\),.*/\1/p' pyproject.toml)
if ! python -c "import sys, transformers; from packaging.version import Version as V; sys.exit(V(transformers.__version__) < V('$lowest'))" 2>/dev/null \
        && [[ -d .device_wheels ]]; then
    echo "upgrading transformers to $lowest from .device_wheels/" >&2
    python -m pip install --quiet --no-index --find-links .device_wheels "transformers==$lowest" || true
fi
# TRL, for the benchmark's GRPOTrainer rows: optional, so a failed install only leaves them out.
if ! python -c "import trl" 2>/dev/null && compgen -G ".device_wheels/trl-*.whl" >/dev/null; then
    python -m pip install --quiet --no-index --find-links .device_wheels trl \
        || echo "TRL did not install from .device_wheels/: the benchmark leaves its rows out" >&2
fi
LOWEST_TRANSFORMERS="$lowest" python - <<'EOF'
import os, sys
import torch, transformers
from packaging.version import Version
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"transformers {transformers.__version__}", file=sys.stderr)
lowest = os.environ["LOWEST_TRANSFORMERS"]
if Version(transformers.__version__) < Version(lowest):
    sys.exit(f"transformers >= {lowest} is needed (pyproject.toml). Fix: bash scripts/fetch_device_wheels.sh "
             "where there is a package index, and carry .device_wheels/ here.")
EOF
exec python scripts/device_check.py "$@"
