#!/usr/bin/env bash
# The one command for a lent GPU machine (python3 with torch, no network): install the wheels carried in
# .whl/ (transformers, deepspeed, hydra and what they need beyond that image), print versions, run the GPU
# tests and the GPU benchmark (~4 min expected on an H200; the timeouts bound it at ~6.5). Logs and
# bench_gpu.json go to $OUT (outputs/gpu_check when unset). .whl/ (git-ignored) holds cp312 manylinux
# x86_64 wheels, never torch: `pip download --no-deps` of the binaries, `pip wheel --no-deps` of sdists.
#
#   bash scripts/bench/gpu_check.sh
# Dry run on a CPU machine whose python already has the packages:
#   SKIP_INSTALL=1 BENCH_ARGS=--smoke OUT=/tmp/gpu_check bash scripts/bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-outputs/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled HF_HUB_OFFLINE=1
t0=$SECONDS

if [ -z "${SKIP_INSTALL:-}" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl >"$OUT/pip.log" 2>&1 || { cat "$OUT/pip.log"; exit 1; }
fi
export PYTHONPATH="$PWD:/tmp/site"  # the repo (train, data, configs), then the carried wheels over the image's

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
    python3 - <<'EOF'
import inspect, sys
import torch, transformers, deepspeed, hydra, omegaconf, peft
from torch.nn.attention.varlen import varlen_attn
print("python", sys.version.split()[0])
for m in (torch, transformers, deepspeed, hydra, omegaconf, peft):
    print(f"{m.__name__} {m.__version__} ({m.__file__})")
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(), torch.cuda.get_device_capability(), "cuda", torch.version.cuda)
print("varlen_attn", inspect.signature(varlen_attn))
EOF
} 2>&1 | tee "$OUT/env.txt"
echo "== setup took $((SECONDS - t0)) s"

# correctness first: the GPU tests (test_gpu.py) and the CPU-side varlen tests (this torch's varlen signature)
timeout 170 python3 -m pytest -q -p no:cacheprovider -rs tests/train/model/test_gpu.py tests/train/model/test_gpu_qlora.py \
    tests/train/model/test_gpu_liger.py tests/train/model/test_gpu_v2pe.py tests/train/model/test_attention_varlen.py \
    2>&1 | tee "$OUT/pytest.log"
tests=${PIPESTATUS[0]}
echo "== pytest exit $tests after $((SECONDS - t0)) s"

# then speed; its table is the last thing printed
timeout 200 python3 scripts/bench/bench_gpu.py --out "$OUT" --budget-s 110 ${BENCH_ARGS:---liger} 2>&1 | tee "$OUT/bench.log"
bench=${PIPESTATUS[0]}
echo "== pytest exit $tests, bench exit $bench, total $((SECONDS - t0)) s"
exit $(( bench != 0 || tests != 0 ))
