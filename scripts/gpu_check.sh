#!/bin/sh
# The real-GPU check of docs/gpu.md: an NCCL all_reduce on CUDA through `clusterrun up`, on a
# localhost node with `nproc_per_node: gpu`, then one rank on GPU 0 only (`gpus: [0]`).
# Run it from the repository root on a machine with NVIDIA GPUs, torch with CUDA, and
# nvidia-smi; it takes a minute or two (three at most: each step has a time limit).
#
#   ./scripts/gpu_check.sh            # uses .venv/bin/python, else $PYTHON
#
# It prints everything it runs and exits 0 only if every step passed. Paste its whole
# output into docs/gpu.md.
set -eu

PY=${PYTHON:-.venv/bin/python}
WORK=$(mktemp -d)
export CLUSTERRUN_HOME="$WORK/home"
trap 'rm -rf "$WORK"' EXIT

cat >"$WORK/allreduce.py" <<'EOF'
import os
import torch
import torch.distributed as dist

local = int(os.environ["LOCAL_RANK"])
torch.cuda.set_device(local)
dist.init_process_group("nccl")
rank, world = dist.get_rank(), dist.get_world_size()
t = torch.full((1 << 20,), float(rank + 1), device="cuda")
dist.all_reduce(t)
want = world * (world + 1) / 2
ok = bool((t == want).all())
print(f"rank {rank}/{world} on cuda:{local} ({torch.cuda.get_device_name(local)}), "
      f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')}, "
      f"torch {torch.__version__}, CUDA {torch.version.cuda}, NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}: "
      f"all_reduce sum {t[0].item():g}, expected {want:g}: {'ok' if ok else 'WRONG'}")
dist.barrier()
dist.destroy_process_group()
raise SystemExit(0 if ok else 1)
EOF

cat >"$WORK/all.yaml" <<EOF
master_port: auto
python: $(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")
env:
  NCCL_DEBUG: WARN
hosts:
  - host: localhost
    nproc_per_node: gpu
EOF
sed 's/nproc_per_node: gpu/gpus: [0]/' "$WORK/all.yaml" >"$WORK/one.yaml"

step() {
    echo
    echo "\$ $*"
    timeout 120 "$@"
}

echo "# $(date -u '+%Y-%m-%d %H:%M UTC') on $(hostname), clusterrun $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
step nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv
step "$PY" -m clusterrun check "$WORK/all.yaml"
step "$PY" -m clusterrun up --dry-run "$WORK/all.yaml" "$WORK/allreduce.py"
step "$PY" -m clusterrun up "$WORK/all.yaml" "$WORK/allreduce.py"
step "$PY" -m clusterrun up "$WORK/one.yaml" "$WORK/allreduce.py"
echo
echo "gpu_check: every step passed"
