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

source "$HERE/_venv.sh"
venv_with_system_torch

# 1. what would pip install? torch/CUDA wheels must not be among it; 2. install for real
pip_install_without_torch "$NVALCHEMI_SPEC" "$WARP_SPEC"

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
