#!/bin/bash
# The GPU check (issue 15), from the repository root. With CUDA (a lent H200 through the device tool, carrying
# .gpu_carry: the gguf package, the tokenizer files and a tiny SEDAC engine, made here first by
#   .venv/bin/python tools/gpu_check.py --carry
# ) it runs the CUDA tests and the bench of tools/gpu_check.py ($OUT/gpu_check.json; under 8 minutes on an H200).
# Without CUDA it runs the GPU kernels' tests and the CUDA layer path under TRITON_INTERPRET=1. Exits nonzero on any failure.
set -o pipefail
PYTHON=${PYTHON:-python3}
KERNEL_TESTS="tests/test_triton_attention.py tests/test_triton_fused.py tests/test_device_sampling.py tests/test_plugins.py
  tests/test_varlen_runner.py tests/test_cuda_graphs.py"
if ! $PYTHON -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  TRITON_INTERPRET=1 exec $PYTHON -m pytest -q -p no:cacheprovider $KERNEL_TESTS
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
PYTHONPATH=.gpu_carry:${PYTHONPATH:-} PYTHONUNBUFFERED=1 $PYTHON tools/gpu_check.py 2>&1 | tee "$OUT/gpu_check.log"
