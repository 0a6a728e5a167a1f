#!/usr/bin/env bash
# On a lent GPU machine: the device tool runs this from the repository root and brings
# $OUT back. Three calls, back to back (files in $MERIT_GPU_DIR survive only while the
# machine stays warm, 30 s after a call):
#
#   bash bench/gpu/run.sh stage   carry .device-bundle/call1   wheels -> site/, data, GGUF part 1
#   bash bench/gpu/run.sh study   carry .device-bundle/call2   join the GGUF; the next study seed
#   bash bench/gpu/run.sh tests   carry .device-bundle/call1/{wheels,data.tar.gz,bundle.json}
#                                 GPU tests; training throughput (random weights of θ(0)'s shape)
#
# `tests` stages what it needs again if the machine went cold; `study` cannot (the GGUF
# needs two calls) and says so. Bundle: bench/gpu/prepare.py.
set -uo pipefail
B=${MERIT_GPU_DIR:-/tmp/merit-gpu}
OUT=${OUT:-$B/out}
CONFIG=${MERIT_STUDY_CONFIG:-configs/study-h200.yaml}
BUNDLE=${MERIT_BUNDLE:-.device-bundle}
PY=${PYTHON:-python3}
STEPS=${MERIT_TP_STEPS:-20}   # timed throughput steps (a dry run on a CPU sets fewer)
mkdir -p "$B" "$OUT"
export PYTHONPATH="$B/site:$PWD" PYTHONUNBUFFERED=1 MERIT_CACHE_DIR="$B/cache" HF_HUB_OFFLINE=1 \
  TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1
t0=$(date +%s)
stamp() { echo "[run.sh +$(( $(date +%s) - t0 ))s] $*"; }

install() {  # wheels into $B/site, tokenized data into $B/store (idempotent)
  local C="$BUNDLE/call1"
  if [ ! -f "$B/site/.installed" ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$B/site" \
      "$C"/wheels/*.whl && touch "$B/site/.installed" || exit 2
  fi
  [ -f "$B/prepared.json" ] || tar xzf "$C/data.tar.gz" -C "$B" || exit 2
  cp "$C/bundle.json" "$B/"
}

case "${1:-}" in
stage)
  install
  cp "$BUNDLE/call1/model.part1" "$B/"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c "import torch, transformers, accelerate, deepspeed, pydantic, gguf; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| transformers', transformers.__version__, '| accelerate', accelerate.__version__, '| deepspeed', deepspeed.__version__, '| pydantic', pydantic.__version__)" 2>&1 | grep -v real_accelerator
  df -h "$B" | tail -1; nproc; free -g | head -2
  stamp "staged in $B"
  ;;
study)
  [ -f "$B/model.part1" ] || { echo "run.sh: $B/model.part1 is gone (the machine went cold after 'stage'); run stage again first"; exit 3; }
  cat "$B/model.part1" "$BUNDLE/call2/model.part2" > "$B/model.gguf"
  want=$("$PY" -c "import json; print(json.load(open('$B/bundle.json'))['gguf_sha256'])")
  got=$(sha256sum "$B/model.gguf" | cut -d' ' -f1)
  [ "$want" = "$got" ] || { echo "run.sh: joined GGUF sha256 $got, expected $want"; exit 4; }
  stamp "study seed ($CONFIG)"
  timeout "${MERIT_STUDY_TIMEOUT:-570}" "$PY" bench/gpu/run_study.py "$CONFIG" --bundle "$B" --out "$OUT" 2>&1 \
    | tee "$OUT/study.log" | grep -v "real_accelerator\|Loading weights\|Writing model shards\|Converting and de-quant"
  rc=${PIPESTATUS[0]}
  stamp "study done (exit $rc)"; exit "$rc"
  ;;
tests)
  install
  stamp "GPU tests"
  timeout 300 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_gpu.py tests/test_packing.py tests/test_train.py \
    2>&1 | tee "$OUT/gpu-tests.log" | grep -v "real_accelerator" | tail -25
  stamp "throughput: batch 32, rows of 2048 tokens, packed vs padded"
  timeout 150 "$PY" bench/train_throughput.py --model "$B/model-config" --random-init --examples "$B/store/data" \
    --batch-size 32 --pack-tokens 2048 --steps "$STEPS" --warmup 2 --compare-padding --json "$OUT/throughput-b32.json" \
    2>&1 | grep -v real_accelerator | tail -7
  stamp "throughput: batch 128, rows of 4096 tokens"
  timeout 100 "$PY" bench/train_throughput.py --model "$B/model-config" --random-init --examples "$B/store/data" \
    --batch-size 128 --pack-tokens 4096 --steps $(( (STEPS + 1) / 2 )) --warmup 2 --json "$OUT/throughput-b128.json" \
    2>&1 | grep -v real_accelerator | tail -6
  stamp "tests done"
  ;;
*)
  echo "usage: bash bench/gpu/run.sh stage|study|tests" >&2; exit 2 ;;
esac
