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

if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    echo "error: $PYTHON has no torch; run this with the interpreter that has cartlorem installed (PYTHON=...)" >&2
    exit 1
fi
SYS_TORCH="$("$PYTHON" -c 'import torch; print(torch.__version__)')"
echo "# system torch $SYS_TORCH ($("$PYTHON" -c 'import sys; print(sys.executable)'))"

if [ ! -x "$VENV/bin/python" ]; then
    echo "# creating $VENV (--system-site-packages)"
    "$PYTHON" -m venv --system-site-packages "$VENV"
fi
VPY="$VENV/bin/python"

# 1. dry run: what would pip install? torch must not be among it.
REPORT="$(mktemp)"
trap 'rm -f "$REPORT"' EXIT
"$VPY" -m pip install --dry-run --quiet --report "$REPORT" "$MACE_SPEC"
TO_INSTALL="$("$VPY" -c "
import json, sys
r = json.load(open(sys.argv[1]))
print(' '.join(f\"{i['metadata']['name']}=={i['metadata']['version']}\" for i in r.get('install', [])))
" "$REPORT")"
echo "# pip would install: $TO_INSTALL"
case " ${TO_INSTALL,,} " in
    *" torch=="*|*" nvidia-"*|*" triton=="*)
        echo "error: pip wants to install torch/CUDA packages into the venv; aborting (install by hand with --no-deps)" >&2
        exit 1 ;;
esac

# 2. install for real
"$VPY" -m pip install --quiet "$MACE_SPEC"

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
