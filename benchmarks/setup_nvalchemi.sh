#!/usr/bin/env bash
# Install nvalchemiops (pip nvalchemi-toolkit-ops) and warp-lang into their own virtual environment,
# for benchmarks/nvalchemi_pme.py only. They are not cartlorem dependencies and never go on CI.
#
#     bash benchmarks/setup_nvalchemi.sh            # creates benchmarks/.venv-nvalchemi
#     VENV=/tmp/venv-nv PYTHON=python3.11 bash benchmarks/setup_nvalchemi.sh
#
# The venv is created with --system-site-packages, so it reuses the base interpreter's torch (no
# second, possibly CUDA, torch download), numpy, ase, vesin and the editable cartlorem; only
# nvalchemi-toolkit-ops and warp-lang (and whatever small pure dependencies pip reports) go inside it.
# The script refuses to go on if pip would install or replace torch (or CUDA wheels) in the venv,
# and checks afterwards that the venv's torch is the system one.
#
# Versions are pinned (NVALCHEMI_SPEC, WARP_SPEC) so that the benchmark's numbers can be reproduced.
# Warp compiles each CPU kernel with its bundled LLVM at first use and caches it (~/.cache/warp);
# on a busy 2-core machine the multipole-PME kernels (l_max = 2, spread/gather and their backward)
# take minutes to tens of minutes the first time: benchmarks/nvalchemi_pme.py reports that first call
# separately. WARM=1 runs one small q + mu + Theta energy + forces call at the end to fill the cache.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${VENV:-$HERE/.venv-nvalchemi}"
PYTHON="${PYTHON:-python3}"
NVALCHEMI_SPEC="${NVALCHEMI_SPEC:-nvalchemi-toolkit-ops==0.5.0}"
WARP_SPEC="${WARP_SPEC:-warp-lang==1.19.0}"

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
# keep the venv out of git wherever it lives (Python >= 3.13 writes this file itself)
[ -f "$VENV/.gitignore" ] || echo "*" > "$VENV/.gitignore"
VPY="$VENV/bin/python"

# 1. dry run: what would pip install? torch must not be among it.
REPORT="$(mktemp)"
trap 'rm -f "$REPORT"' EXIT
"$VPY" -m pip install --dry-run --quiet --report "$REPORT" "$NVALCHEMI_SPEC" "$WARP_SPEC"
TO_INSTALL="$("$VPY" -c "
import json, sys
r = json.load(open(sys.argv[1]))
print(' '.join(f\"{i['metadata']['name']}=={i['metadata']['version']}\" for i in r.get('install', [])))
" "$REPORT")"
echo "# pip would install: ${TO_INSTALL:-nothing (already installed)}"
case " ${TO_INSTALL,,} " in
    *" torch=="*|*" nvidia-"*|*" triton=="*)
        echo "error: pip wants to install torch/CUDA packages into the venv; aborting (install by hand with --no-deps)" >&2
        exit 1 ;;
esac

# 2. install for real
"$VPY" -m pip install --quiet "$NVALCHEMI_SPEC" "$WARP_SPEC"

# 3. check: the venv uses the system torch; nvalchemiops, warp (CPU device) and cartlorem import
"$VPY" - <<EOF
import torch, warp, cartlorem
from nvalchemiops.torch.interactions.electrostatics import multipole_particle_mesh_ewald  # noqa: F401
from importlib.metadata import version
assert torch.__version__ == "$SYS_TORCH", f"venv torch {torch.__version__} != system torch $SYS_TORCH"
warp.config.quiet = True
warp.init()
assert warp.is_cpu_available(), "warp has no CPU device"
print(f"# venv ok: torch {torch.__version__}, nvalchemi-toolkit-ops {version('nvalchemi-toolkit-ops')}, "
      f"warp-lang {warp.__version__}, cartlorem from {cartlorem.__file__}")
EOF
echo "# system torch still $("$PYTHON" -c 'import torch; print(torch.__version__)')"

if [ "${WARM:-0}" = "1" ]; then
    echo "# compiling warp's CPU kernels (once; cached in ~/.cache/warp) ..."
    (cd "$HERE/.." && PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$VPY" benchmarks/nvalchemi_pme.py --warm-only)
fi
echo "# run: $VPY benchmarks/nvalchemi_pme.py   (or NVALCHEMI_PYTHON=$VPY python3 benchmarks/nvalchemi_pme.py; the default venv is found without it)"
