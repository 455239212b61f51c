#!/usr/bin/env bash
# Bring your own model: fetch -> mine rules with its tokenizer -> train a merge module -> evaluate
# -> measure fidelity through vLLM -> serve. TOKENS sets the training budget (tiny by default:
# a plumbing run; a useful module needs millions of tokens, see docs/training.md).
#   MODEL=~/.cache/vllm_umim/models/smollm2-135m TOKENS=4096 bash examples/bring_your_own_model.sh OUT_DIR
set -euo pipefail
OUT="${1:-/tmp/vllm_umim-byom}"; mkdir -p "$OUT"
MODEL="${MODEL:-$(vllm-umim fetch-model smollm2-135m)}"
CORPUS="${CORPUS:-$(vllm-umim fetch-corpus wiki)}"
TOKENS="${TOKENS:-4096}"
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}" VLLM_CPU_OMP_THREADS_BIND="${VLLM_CPU_OMP_THREADS_BIND:-0-1}"

vllm-umim mine --model "$MODEL" --corpus "$CORPUS/train.txt" --threshold "${THRESHOLD:-5}" -o "$OUT/rules.bin"
vllm-umim train --model "$MODEL" --rules "$OUT/rules.bin" --corpus "$CORPUS/train.txt" -o "$OUT/module.safetensors" \
    --max-tokens "$TOKENS" --cache-tokens "$TOKENS" --seq-len 64 --batch-size 4 --eval-every 1000 --threads 2
vllm-umim eval --model "$MODEL" --rules "$OUT/rules.bin" --module "$OUT/module.safetensors" \
    --corpus "$CORPUS/heldout.txt" --windows "${EVAL_WINDOWS:-4}" --seq-len 64 --tr-documents 200 --no-progress --json "$OUT/eval.json"
vllm-umim fidelity --model "$MODEL" --rules "$OUT/rules.bin" --limit "${FIDELITY_PROMPTS:-4}" --no-bf16-line --json "$OUT/fidelity.json"
if [ -z "${NO_SERVE:-}" ]; then
    echo "serving: vllm serve $MODEL --umim-rules $OUT/rules.bin (module.safetensors beside it)"
    exec vllm serve "$MODEL" --umim-rules "$OUT/rules.bin"
fi
