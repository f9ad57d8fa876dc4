# Shared steps of benchmarks/setup_peers.sh and benchmarks/setup_nvalchemi.sh (sourced, not run):
# a venv that reuses the system interpreter's torch, and a pip install that refuses torch/CUDA wheels.
# Needs, set by the caller: PYTHON (base interpreter) and VENV (venv folder).
# Sets SYS_TORCH (the system torch version) and VPY (the venv's python).

venv_with_system_torch() {
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
}

# pip_install_without_torch SPEC...: a dry run first (pip's JSON report); abort if it would put torch,
# nvidia-* or triton into the venv; otherwise install for real.
pip_install_without_torch() {
    local report to_install
    report="$(mktemp)"
    "$VPY" -m pip install --dry-run --quiet --report "$report" "$@"
    to_install="$("$VPY" -c "
import json, sys
r = json.load(open(sys.argv[1]))
print(' '.join(f\"{i['metadata']['name']}=={i['metadata']['version']}\" for i in r.get('install', [])))
" "$report")"
    rm -f "$report"
    echo "# pip would install: ${to_install:-nothing (already installed)}"
    case " ${to_install,,} " in
        *" torch=="*|*" nvidia-"*|*" triton=="*)
            echo "error: pip wants to install torch/CUDA packages into the venv; aborting (install by hand with --no-deps)" >&2
            exit 1 ;;
    esac
    "$VPY" -m pip install --quiet "$@"
}
