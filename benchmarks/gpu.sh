#!/usr/bin/env bash
# The GPU columns of the benchmarks, in one run on a machine with a CUDA device:
#   1. tests/test_cuda.py: model, multipole sums, training and calculator on the GPU against the CPU (float64);
#   2. one training step (train_step.py --device cuda): none / multipole / lorem against MACE, dimers and cumulene;
#   3. the compiled training step (train(compile=True), Inductor's Triton kernels) on the dimers;
#   4. inference energy + forces and peak GPU memory against MACE (speed.py --device cuda), 10^3 - 10^5 atoms;
#   5. periodic multipole fields by PME (pme_cost.py --device cuda), 10^5 - 10^6 atoms.
# Each stage has its own time limit, so that one slow stage cannot take the others' time, and the results are
# packed into OUTDIR/gpu_results.tar.gz after every stage (a run stopped from outside keeps what it finished); the
# files themselves are written to WORK (default OUTDIR/r).
#
#   bash benchmarks/gpu.sh OUTDIR [DATA_DIR]      # DATA_DIR: dimers.xyz and cumulene.xyz (default ../shared/data)
#
# MACE must be importable by this python3 (mace-torch with e3nn 0.4.4; it is then used as the peer interpreter
# through CARTLOREM_PEER_PYTHON); without it the MACE rows say why. QUICK=1: tiny sizes and limits, for a dry run
# of the script itself (it falls back to the CPU without CUDA).
set -u
OUTDIR=$(mkdir -p "${1:?usage: gpu.sh OUTDIR [DATA_DIR]}" && cd "$1" && pwd)
DATA=${2:-../shared/data}
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1
export CARTLOREM_PEER_PYTHON="${CARTLOREM_PEER_PYTHON:-$(command -v python3)}"
R=$(mkdir -p "${WORK:-$OUTDIR/r}" && cd "${WORK:-$OUTDIR/r}" && pwd)
if [ "${QUICK:-0}" = 1 ]; then
    T=(60 120 200 120 60) STEP="--repeats 2 --warmup 1 --n-batches 2" SETS="dimers" SPEED="diamond:2;water:3"
    PME="4,6" COMPILE_KINDS="none"
else
    T=(75 90 220 110 70) STEP="--repeats 20 --warmup 5" SETS="dimers cumulene" SPEED="diamond:5,13;water:10,32"
    PME="32,48,70" COMPILE_KINDS="none multipole"
fi

pack() { tar czf "$OUTDIR/gpu_results.tar.gz" -C "$(dirname "$R")" "$(basename "$R")"; }
stage() {  # stage NAME SECONDS COMMAND...: run with a limit, log to r/NAME.log, say how it ended, pack
    local name=$1 limit=$2 t0 rc
    shift 2
    t0=$(date +%s)
    timeout "$limit" "$@" > "$R/$name.log" 2>&1
    rc=$?
    echo "# $name: exit $rc after $(( $(date +%s) - t0 )) s (limit $limit s)" | tee -a "$R/stages.txt"
    pack
}

{
    date -u +%FT%TZ
    git rev-parse HEAD 2>/dev/null || echo "${CARTLOREM_GIT_COMMIT:-(no git)}"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
    python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name())"
    nproc
} > "$R/machine.txt" 2>&1

stage test_cuda "${T[0]}" python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py
# shellcheck disable=SC2086
stage train_step "${T[1]}" python3 benchmarks/train_step.py --device cuda --data-dir "$DATA" --sets $SETS \
    --channels 32 --kinds none multipole lorem --variants '' --mace --profile-steps 0 $STEP --out "$R/train_step.gpu"
# shellcheck disable=SC2086
stage train_step_compiled "${T[2]}" python3 benchmarks/train_step.py --device cuda --data-dir "$DATA" --sets dimers \
    --channels 32 --kinds $COMPILE_KINDS --variants '' +compile --profile-steps 0 $STEP --out "$R/train_step.gpu_compiled"
stage speed "${T[3]}" python3 benchmarks/speed.py --device cuda --dtype float32 --channels 64 \
    --models short,multipole,mace --sizes "$SPEED" --repeats 5 --budget 60 --profile never --out "$R/speed.gpu"
stage pme "${T[4]}" python3 benchmarks/pme_cost.py --device cuda --sizes "$PME" --dtype float32 --accuracy 1e-5 \
    --ewald-max 0 --no-nvalchemi --repeats 3 --threads 8 --out "$R/pme_cost.gpu"
