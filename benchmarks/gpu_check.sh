#!/usr/bin/env bash
# The GPU checks of a session that is lent a GPU, in priority order, each under its own time limit
# (the device budget is short). Prints a short summary; copies result JSONs to $OUT when set.
#
#   bash benchmarks/gpu_check.sh            # about 10 minutes on an H100, after the machine has started
#
# 1. every cuda-marked test (Triton kernels compiled, FAISS GPU if installed, index and loss on CUDA);
# 2. the fused loss at the goal size (N = 8192, three CoMCL levels) against PML SupConLoss;
# 3. the training step (ResNet-50, 256 patches at 128 px, bf16);
# 4. the full loss table (N = 1024 ... 16384, every peer);
# 5. the index benchmark (banks 65k, 1M, 4M).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
stage() {  # stage NAME SECONDS CMD...
    local name=$1 limit=$2; shift 2
    echo "=== $name (limit ${limit}s)"
    local t0=$SECONDS
    timeout "$limit" "$@"
    echo "=== $name: exit $? after $((SECONDS - t0)) s"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
stage "cuda tests" 240 $PY -m pytest -q -m cuda -p no:cacheprovider tests
stage "loss at N=8192" 120 $PY benchmarks/bench_loss.py --sizes 8192 --curve --methods ours_fused,ours_fused_torch,pml_supcon \
    --out benchmarks/results/loss_cuda_goal.json
stage "training step" 120 $PY benchmarks/bench_step.py
stage "loss table" 300 $PY benchmarks/bench_loss.py
stage "index" 300 $PY benchmarks/bench_index.py --repeat 3
if [ -n "${OUT:-}" ]; then
    cp benchmarks/results/*cuda*.json benchmarks/results/*cuda*.png "$OUT"/ 2>/dev/null || true
fi
