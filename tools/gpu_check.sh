#!/bin/bash
# The GPU check to run once on a lent machine (device tool), from the repository root:
#   carry .gpu_carry: the gguf package (absent there) and engines/smollm2's tokenizer files, e.g.
#   mkdir -p .gpu_carry && cp -r .venv/lib/python3.11/site-packages/gguf engines/smollm2/tokenizer* \
#     engines/smollm2/chat_template.jinja .gpu_carry/
# Figures land in $OUT/gpu_check.json (tools/gpu_check.py says what they are).
set -o pipefail
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
PYTHONPATH=.gpu_carry:${PYTHONPATH:-} PYTHONUNBUFFERED=1 python3 tools/gpu_check.py 2>&1 | tee "${OUT:-/tmp}/gpu_check.log"
