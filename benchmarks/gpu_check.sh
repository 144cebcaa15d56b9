#!/usr/bin/env bash
# The GPU checks, in one go (nothing here runs on a CPU-only machine):
#   bash benchmarks/gpu_check.sh [OUT_DIR]        (default runs/gpu_check; the runs go to RUNS=OUT_DIR/runs)
# in order of importance:
# 1. the CUDA/Triton tests (fused KD loss vs the reference; bf16 CTCD through real engines, ZeRO-2 and 3);
# 2. benchmarks/kd_loss.py --device cuda, fp32 logits (with the torch.compile baseline);
# 3. CTCD pre-training of the paper pair (6L-768 <-> 4L-768), bf16, ZeRO-2, PAPER_STEPS steps: tokens/s,
#    peak memory, losses (OUT_DIR/paper_metrics.jsonl);
# 4. benchmarks/kd_loss.py --device cuda, bf16 logits;
# 5. benchmarks/step.py on the paper pair, bf16, ZeRO-2;
# 6. a short CTCD run of BERT-large <-> BERT-base (LARGE_STEPS steps; OUT_DIR/large_metrics.jsonl).
# Each check has its own time limit and log (OUT_DIR/NAME.log); a failed check does not stop the others,
# and the script exits non-zero if any failed. TOKENIZER=DIR gives the paper/large runs a tokenizer
# (the bundled corpus alone yields a ~7.7K-piece vocabulary; BERT's is 30522).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/gpu_check}
runs=${RUNS:-$out/runs}
mkdir -p "$out" "$runs"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PAPER_STEPS=${PAPER_STEPS:-300}
LARGE_STEPS=${LARGE_STEPS:-40}
tok=()
[ -n "${TOKENIZER:-}" ] && tok=("--tokenizer.path=$TOKENIZER")
PY=${PYTHON:-python3}
failed=()

check() {  # check NAME SECONDS COMMAND...: run it with a time limit, log it, show its tail
  local name=$1 limit=$2 start rc
  shift 2
  echo "== $name: $*"
  start=$(date +%s)
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  rc=$?
  echo "   exit $rc after $(($(date +%s) - start)) s"
  grep -v -e 'it/s' -e 'examples/s' -e 's/it' "$out/$name.log" | tail -n "${TAIL:-14}"
  [ "$rc" -eq 0 ] || failed+=("$name")
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c 'import torch, triton, deepspeed, transformers; print("torch", torch.__version__, "triton", triton.__version__, "deepspeed", deepspeed.__version__, "transformers", transformers.__version__)'

check tests 200 "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_fused_kd.py tests/test_train.py -k "cuda or triton or gpu"
TAIL=40 check kd_loss_fp32 150 "$PY" benchmarks/kd_loss.py --device cuda --rows 1024 4096 16384 --vocab 8192 30522 --hidden 768 --reps 10
check pretrain_paper 150 "$PY" -m ctcd_ds.cli pretrain --config ctcd_paper "${tok[@]}" --output_dir="$runs/ctcd-paper" \
  --train.steps="$PAPER_STEPS" --train.log_every=10 --train.eval_every=100 --checkpoint.every="$PAPER_STEPS" --checkpoint.keep_last=1
cp "$runs/ctcd-paper/metrics.jsonl" "$out/paper_metrics.jsonl" 2>/dev/null
TAIL=40 check kd_loss_bf16 90 "$PY" benchmarks/kd_loss.py --device cuda --dtype bf16 --rows 1024 4096 16384 --vocab 8192 30522 --hidden 768 --reps 10 --no-compile
check step_paper 120 "$PY" benchmarks/step.py --config ctcd_paper --reps 20 "${tok[@]}" --train.eval_batches=1 --checkpoint.every=0 --export=false
check pretrain_large 120 "$PY" -m ctcd_ds.cli pretrain --config ctcd_large "${tok[@]}" --output_dir="$runs/ctcd-large" \
  --train.steps="$LARGE_STEPS" --train.log_every=10 --train.eval_every=0 --train.eval_batches=4 --checkpoint.every=0 --export=false
cp "$runs/ctcd-large/metrics.jsonl" "$out/large_metrics.jsonl" 2>/dev/null

if [ "${#failed[@]}" -gt 0 ]; then
  echo "FAILED: ${failed[*]}"
  exit 1
fi
echo "all GPU checks passed"
