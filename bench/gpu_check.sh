#!/usr/bin/env bash
# The one-command GPU check: bf16 PLoRA under DeepSpeed ZeRO-2 and ZeRO-3 against the one-process
# run on a 1.1B-parameter Llama (random weights), gradient checkpointing on, every unload exact,
# the memory estimate against the measured peak, MFU (bench/gpu_check.py says what and how).
# About 10 minutes at most on one GPU; every visible GPU is a worker.
#   bash bench/gpu_check.sh [--out DIR] [more bench/gpu_check.py options]
# Without a GPU: prints "skipped: no GPU" and exits 0. Exit 1: a check failed (FAIL lines say
# which); 124: it ran past GPU_CHECK_TIMEOUT seconds (default 600).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if ! found=$("$PYTHON" -c "import torch; print('gpu' if torch.cuda.is_available() else 'none')"); then
    echo "error: $PYTHON cannot import torch: install the project (pip install -e .) or set PYTHON" >&2
    exit 2
fi
if [ "$found" != gpu ]; then
    echo "skipped: no GPU"
    exit 0
fi
export DS_ACCELERATOR=cuda HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec timeout "${GPU_CHECK_TIMEOUT:-600}" "$PYTHON" bench/gpu_check.py "$@"
