#!/usr/bin/env bash
# The GPU checks a lent machine is for, in the order they matter, each under 10 minutes.
#
#   bash bench/gpu_session.sh all      # for a 15-minute lease: one call of at most 9.5 minutes doing the
#                                      # three below in short (timeouts 45 + 150 + 180 + 125 + 15 + 55 s)
#   bash bench/gpu_session.sh tests    # the test suite on CUDA: compiled kernels, forward and backward
#   bash bench/gpu_session.sh tune     # tune RGA-SC stage shapes (B=64, float32 + bfloat16, eval + train)
#   bash bench/gpu_session.sh train    # issue #6 table: RGA-SC training steps at the RGA-Net stages
#   bash bench/gpu_session.sh step     # issue #7 table: RGA-Net training steps, authors' blocks vs converted
#   bash bench/gpu_session.sh paper    # one more slice of `sweep.py --preset paper` (resumable)
#
# Results go to bench/results/<device>/ (commit them) and, when $OUT is set (the device tool),
# are copied there as one tarball. The machine keeps its own torch and Triton (--no-deps).
# Every step runs under `timeout` (a command past the device tool's 10 minutes returns nothing) and
# whatever happens, the results are packed on exit: a failing or cut step still brings back its
# log and the CSV rows written so far.
set -uo pipefail
cd "$(dirname "$0")/.."
# the machine keeps its torch and Triton; PYTHONPATH too, in case its pip cannot build (no setuptools >= 77 there)
python -m pip install -q --no-deps -e . >/dev/null 2>&1 || echo "pip install -e . failed: using PYTHONPATH" >&2
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
what="${1:?usage: bash bench/gpu_session.sh all|tests|tune|train|step|paper}"
log="bench/results/gpu_session_${what}.log"
mkdir -p bench/results
pack() { if [ -n "${OUT:-}" ]; then tar czf "$OUT/results_${what}.tgz" bench/results rga_triton/configs; fi; }
trap pack EXIT
case "$what" in
  # Tests pin each kernel to its space's first config (RGA_TRITON_PIN_CONFIG=1): autotuning every tiny
  # test shape would take the whole lease; CI compiles every config of every space for sm_90 instead.
  tests) RGA_TRITON_PIN_CONFIG=1 timeout 540 python -m pytest -q -x tests/ 2>&1 | tee "$log" ;;
  all)
    # 0. does compilation scale over this host's threads (the premise of launch/precompile.py)? (~20 s)
    timeout 45 python bench/studies/compile_threads.py --cases 16 --threads 8 2>&1 | tee "$log" || true
    # 1. the compiled kernels against the float64 reference, forward and backward (~2 min)
    RGA_TRITON_PIN_CONFIG=1 timeout 150 python -m pytest -q -x -m "not slow" tests/block/test_triton_backward.py \
      tests/steps/test_op_projection.py tests/steps/test_op_relation.py tests/steps/test_op_gating.py tests/block/test_triton_path.py \
      tests/block/test_gpu_numerics.py tests/block/test_algorithm.py tests/block/test_amp_layout.py 2>&1 | tee -a "$log" || true
    # 2. tune the RGA-Net stages (float32, B=64), writing the config file after each shape (~3 min)
    timeout 180 python bench/sweep.py --tune --inputs 256x128 --batch 64 --branches RGA-SC --dtypes float32 \
      --modes eval,train --time-limit 130 2>&1 | tee -a "$log" || true
    # 3. the issue #6 table with the tuned file: RGA-SC train + eval, reference vs torch vs triton (~2 min)
    timeout 125 python bench/sweep.py --inputs 256x128 --batch 64 --branches RGA-SC --modes train,eval \
      --dtypes float32 --impls reference,torch,triton --time-limit 75 --resume 2>&1 | tee -a "$log" || true
    timeout 15 python bench/studies/goals.py 2>&1 | tee -a "$log" || true       # which of issue 6's goals hold
    # 4. the projection's backward kernels against the PyTorch formula they replaced: the same train rows
    #    with RGA_TRITON_PROJECTION_BACKWARD=torch, in their own folder (compare the triton rows' ms)
    RGA_TRITON_PROJECTION_BACKWARD=torch timeout 55 python bench/sweep.py --inputs 256x128 --batch 64 \
      --branches RGA-SC --modes train --dtypes float32 --impls triton --time-limit 35 --no-plots \
      --out bench/results/projection_backward_torch 2>&1 | tee -a "$log" || true ;;
  tune)  timeout 560 python bench/sweep.py --tune --inputs 256x128 --batch 64 --branches RGA-SC \
           --dtypes float32,bfloat16 --modes eval,train --time-limit 480 2>&1 | tee "$log" ;;
  train) timeout 540 python bench/sweep.py --inputs 256x128 --batch 64 --branches RGA-SC --modes train \
           --dtypes float32,bfloat16 --impls reference,compile,torch,triton,triton-graphs --time-limit 480 --resume \
           2>&1 | tee "$log"
         timeout 15 python bench/studies/goals.py 2>&1 | tee -a "$log"
         timeout 15 python bench/studies/goals.py --impl triton-graphs 2>&1 | tee -a "$log" ;;
  step)  timeout 540 python bench/studies/rga_net_step.py --compile both --precisions float32,bf16-autocast 2>&1 | tee "$log"
         timeout 15 python bench/studies/goals.py 2>&1 | tee -a "$log" ;;
  paper) timeout 560 python bench/sweep.py --preset paper --time-limit 500 --resume 2>&1 | tee "$log" ;;
  *) echo "unknown step: $what" >&2; exit 2 ;;
esac
