#!/usr/bin/env bash
# Everything measured on the lent GPU machine in one call (see docs/benchmarks.md):
#   bash benchmarks/device_run.sh [quick|full|kernels|capacity|nccl]   (logs and JSON under $OUT)
# full: GPU tests, then ours against PyTorch on one GPU and the 2-GPU layouts; kernels: the
# per-kernel tables and the fused kernels against what they replaced; capacity: the largest one-GPU model, and twice it on two GPUs; nccl: the
# 2-GPU timelines, and the 2-GPU benches with NCCL held to fewer channels (SMs).
# The machine's python3 has numpy, h5py, click, mpi4py, cupy and torch; nothing is downloaded.
set -uo pipefail
OUT=${OUT:-/tmp/wm-out}; mkdir -p "$OUT"
mode=${1:-full}
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || python3 -m pip install -q --no-deps -e .
nvidia-smi -L; python3 -c "import cupy, numpy; print('cupy', cupy.__version__, 'numpy', numpy.__version__)"
C1="--n-lat 720 --n-lon 1440 --n-prognostic 69 --n-static 3 --patch-lat 1 --patch-lon 60 --embed-dim 4320 --token-hidden-dim 8640 --channel-hidden-dim 4320 --blocks 3"
run() { echo "+ $*"; "$@" 2>&1 | tee -a "$OUT/log.txt"; }
ngpu=$(nvidia-smi -L | wc -l)
MPI="mpiexec --allow-run-as-root --oversubscribe -x NCCL_NVLS_ENABLE -x PYTHONUNBUFFERED"
if [ "$mode" = kernels ]; then
  run env CUDA_VISIBLE_DEVICES=0 python3 benchmarks/gpu_profile.py --model c1
  run env CUDA_VISIBLE_DEVICES=0 python3 benchmarks/gpu_kernels.py --model c1 --top 25
  run env CUDA_VISIBLE_DEVICES=0 python3 benchmarks/gpu_fused.py
  run env CUDA_VISIBLE_DEVICES=0 python3 benchmarks/gpu_overlap.py
  exit 0
fi
if [ "$mode" = nccl ]; then
  run env CUDA_VISIBLE_DEVICES=0 weathermixer bench $C1 --batch 1 --steps 5 --json "$OUT/bench_1gpu.json"
  run $MPI -n 2 python3 benchmarks/gpu_timeline.py --grid 2x1 --batch 1
  run $MPI -n 2 python3 benchmarks/gpu_timeline.py --grid 1x1 --batch 2
  for ch in default 2 4 8; do
    env=(); [ "$ch" = default ] || env=(-x NCCL_MAX_NCHANNELS="$ch")
    echo "== NCCL_MAX_NCHANNELS=$ch" | tee -a "$OUT/log.txt"
    run $MPI "${env[@]}" -n 2 weathermixer bench $C1 --jigsaw 1 --batch 2 --steps 5 --json "$OUT/bench_dp2_$ch.json"
    run $MPI "${env[@]}" -n 2 weathermixer bench $C1 --grid 2x1 --batch 1 --steps 5 --json "$OUT/bench_2x1_$ch.json"
  done
  exit 0
fi
if [ "$mode" = capacity ]; then
  # every card acts as an H100 80GB (cudaMemGetInfo total 79.18 GiB); CARD_GIB=card: as it is
  run env CUDA_VISIBLE_DEVICES=0 python3 benchmarks/capacity.py one --card-gib "${CARD_GIB:-79.18}" \
      --json "$OUT/cap1.json" &&
  run $MPI -n 2 python3 benchmarks/capacity.py two --from "$OUT/cap1.json" --json "$OUT/cap2.json"
  exit 0
fi
run python3 -m pytest -q -x tests/test_gpu.py tests/test_optim.py tests/test_model.py \
    tests/test_autograd.py -k "cupy or gpu or GPU" || exit 1
if [ "$mode" = quick ]; then
  run python3 benchmarks/gpu_benchmark.py --model mid --steps 3 --no-compile
  exit 0
fi
run env CUDA_VISIBLE_DEVICES=0 python3 benchmarks/gpu_benchmark.py --model c1 --steps 5 --json "$OUT/c1_1gpu.json"
if [ "$ngpu" -ge 2 ]; then
  run env CUDA_VISIBLE_DEVICES=0 weathermixer bench $C1 --batch 1 --steps 7 --json "$OUT/bench_1gpu.json"
  run $MPI -n 2 weathermixer bench $C1 --jigsaw 2 --batch 1 --steps 7 --json "$OUT/bench_2way.json"
  run $MPI -n 2 weathermixer bench $C1 --grid 2x1 --batch 1 --steps 7 --json "$OUT/bench_2x1.json"
  run $MPI -n 2 weathermixer bench $C1 --jigsaw 1 --batch 2 --steps 7 --json "$OUT/bench_dp2.json"
fi
