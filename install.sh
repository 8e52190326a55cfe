#!/usr/bin/env bash
# Atelier set-up in one command: creates .venv and installs everything, torch included.
#   ./install.sh
# Without an NVIDIA GPU, torch is pinned to the CPU build 2.13.0 so pip does not pull
# several GB of CUDA packages; with one, pip's normal (CUDA) build is installed.
set -euo pipefail
cd "$(dirname "$0")"

python_bin=${PYTHON:-python3}
"$python_bin" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || { echo "Atelier needs Python >= 3.11 (set PYTHON=/path/to/python3.11)" >&2; exit 1; }

[[ -x .venv/bin/python ]] || "$python_bin" -m venv .venv
pip=(.venv/bin/python -m pip install --disable-pip-version-check)

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  torch_spec=${ATELIER_TORCH:-torch}
else
  torch_spec=${ATELIER_TORCH:-torch==2.13.0}
fi
"${pip[@]}" "$torch_spec"

# Constrain to the torch just installed so no dependency swaps it for another build.
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
.venv/bin/python -c 'import torch; print("torch==" + torch.__version__.split("+")[0])' >"$constraints"
"${pip[@]}" -c "$constraints" -e ".[runner,dev]"
echo "Atelier is installed in .venv. Try: .venv/bin/atelier --help"
