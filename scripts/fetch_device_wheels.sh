#!/usr/bin/env bash
# Wheels for a GPU machine without a package index (scripts/device_check.sh installs them there):
# the project's run-time packages that such a machine lacks, for its Python (3.12 by default),
# with their dependencies, into .device_wheels/ (git-ignored; the device tool carries it).
#
#   bash scripts/fetch_device_wheels.sh            # for Python 3.12, manylinux x86_64
#   PYTHON_VERSION=3.11 bash scripts/fetch_device_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
version="${PYTHON_VERSION:-3.12}"
# torch, transformers, tokenizers, safetensors, peft and tensorboard are on the machine already;
# --no-deps on those would leave nothing to pin, so they are left out here and not pulled in below.
python -m pip download --quiet --dest .device_wheels --only-binary=:all: --python-version "$version" \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    --platform any --no-deps \
    gymnasium cloudpickle farama-notifications "stable-baselines3>=2.4,<3" "sb3-contrib>=2.4,<3" \
    vaderSentiment requests charset-normalizer idna urllib3 certifi tqdm rich markdown-it-py mdurl pygments \
    matplotlib contourpy cycler fonttools kiwisolver pyparsing python-dateutil six pillow \
    pytest iniconfig pluggy
du -sh .device_wheels
