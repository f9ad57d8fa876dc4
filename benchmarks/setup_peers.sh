#!/usr/bin/env bash
# Install the peer models of the benchmarks (MACE) into their own virtual environment.
#
#     bash benchmarks/setup_peers.sh            # creates benchmarks/.venv-peers
#     PYTHON=python3.11 bash benchmarks/setup_peers.sh
#
# Why a venv: mace-torch pins e3nn==0.4.4, while cartlorem's tests need e3nn >= 0.5. Installing
# mace-torch into the main interpreter would downgrade e3nn there. The venv is created with
# --system-site-packages, so it reuses the main interpreter's torch (no second, possibly CUDA,
# torch download) and the editable cartlorem; only e3nn 0.4.4 and MACE's small dependencies are
# installed inside it, shadowing the system e3nn for this venv only.
#
# The script refuses to go on if pip would install or replace torch inside the venv.
# Afterwards, benchmarks/speed.py and benchmarks/accuracy.py find benchmarks/.venv-peers/bin/python
# by themselves and run the MACE rows with it.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${VENV:-$HERE/.venv-peers}"
PYTHON="${PYTHON:-python3}"
MACE_SPEC="${MACE_SPEC:-mace-torch==0.3.16}"

source "$HERE/_venv.sh"
venv_with_system_torch

# 1. what would pip install? torch/CUDA wheels must not be among it; 2. install for real
pip_install_without_torch "$MACE_SPEC"

# 3. check: the venv uses the system torch, e3nn 0.4.4, MACE imports, cartlorem imports
"$VPY" - <<EOF
import torch, e3nn, mace, cartlorem
from mace.modules import ScaleShiftMACE  # noqa: F401
from importlib.metadata import version
assert torch.__version__ == "$SYS_TORCH", f"venv torch {torch.__version__} != system torch $SYS_TORCH"
print(f"# venv ok: torch {torch.__version__}, e3nn {e3nn.__version__}, mace-torch {version('mace-torch')}, "
      f"cartlorem from {cartlorem.__file__}")
EOF
# the system interpreter must still have its own e3nn
echo "# system e3nn still $("$PYTHON" -c 'import e3nn; print(e3nn.__version__)')"
