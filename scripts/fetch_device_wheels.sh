#!/usr/bin/env bash
# Wheels for a GPU machine without a package index (scripts/device_check.sh installs them there):
# the project's run-time packages that such a machine lacks, for its Python (3.12 by default),
# into .device_wheels/ (git-ignored; the device tool carries it: about 47 MB of its 64 MiB).
#
#   bash scripts/fetch_device_wheels.sh            # for Python 3.12, manylinux x86_64
#   PYTHON_VERSION=3.11 bash scripts/fetch_device_wheels.sh
#
# Three groups, each --no-deps (a dependency would pull a multi-GB CUDA torch):
# 1. what the project imports beyond torch and transformers, with their dependencies;
# 2. transformers at the project's lowest version (pyproject.toml): the lent machines' image had
#    5.17 (/work/.library/device/KINDS.md, 2026-11), and the project needs its cache API of 5.24
#    (5.17 fails the tests: SlotCacheLayer.lazy_initialization). 5.24 asks nothing newer of that
#    image (huggingface-hub >= 1.31, tokenizers >= 0.23.1, safetensors >= 0.8, regex, typer);
# 3. TRL for the benchmark's GRPOTrainer rows (optional there): trl and the datasets it imports,
#    in two versions with their pins (datasets 5.2 wants pyarrow >= 24, 4.7 makes do with 21), so
#    that pip picks what the machine's pyarrow and fsspec allow.
set -euo pipefail
cd "$(dirname "$0")/.."
version="${PYTHON_VERSION:-3.12}"
download() {
    python -m pip download --quiet --dest .device_wheels --only-binary=:all: --python-version "$version" \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
        --platform any --no-deps "$@"
}
download gymnasium cloudpickle farama-notifications "stable-baselines3>=2.4,<3" "sb3-contrib>=2.4,<3" \
    vaderSentiment requests charset-normalizer idna urllib3 certifi tqdm rich markdown-it-py mdurl pygments \
    matplotlib contourpy cycler fonttools kiwisolver pyparsing python-dateutil six pillow \
    pytest iniconfig pluggy
lowest_transformers=$(sed -n 's/^ *"transformers>=\([0-9.]*\),.*/\1/p' pyproject.toml)
download "transformers==$lowest_transformers"
download trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 fsspec==2026.9.0 xxhash
download datasets==4.7.0 dill==0.4.0 multiprocess==0.70.18 fsspec==2026.2.0  # each call: one version of each
du -sh .device_wheels
