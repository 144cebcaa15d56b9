#!/usr/bin/env bash
# The GPU checks, in one go, in at most 8 minutes (time limits 470 s in all; nothing here runs without a GPU):
#   bash benchmarks/gpu_check.sh [OUT_DIR]     (default benchmarks/results/gpu-<device>-<date>)
# in order of importance:
# 1. the CUDA/Triton tests (fused KD loss and its one-pass kernel vs the reference; bf16 CTCD through real
#    engines, ZeRO-2 and 3; the step's no-device-wait checks);
# 2. the MFU ablation of the paper pair (6L-768 <-> 4L-768, bf16): the defaults and each member alone (CTCD /
#    (teacher + student)) first, then every efficiency lever, torch.compile last -> OUT_DIR/ablation_paper/
#    (rewritten after each variant: a time limit keeps what was measured);
# 3. the profile of a paper-pair step: where the time goes, device busy share -> OUT_DIR/profile_paper/;
# 4. BERT-large <-> BERT-base at the defaults (and each alone) -> OUT_DIR/ablation_large/;
# 5. benchmarks/kd_loss.py --device cuda: the KD loss alone, bf16 logits, one-pass and two-pass kernels
#    against a copy of the same bytes.
# Each check has its own time limit and log (OUT_DIR/NAME.log); a failed check does not stop the others,
# and the script exits non-zero if any failed. TOKENIZER=DIR gives the runs a tokenizer (the bundled corpus
# alone yields a ~7.7K-piece vocabulary; BERT's is 30522). STEPS/WARMUP set the ablations' timed steps.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
device=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr -cs 'A-Za-z0-9' '-' | sed 's/^NVIDIA-//; s/-$//' | tr '[:upper:]' '[:lower:]')
out=${1:-benchmarks/results/gpu-${device:-unknown}-$(date +%F)}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
STEPS=${STEPS:-20}
WARMUP=${WARMUP:-5}
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

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,power.limit,clocks.max.sm --format=csv,noheader
  "$PY" -c 'import torch, triton, deepspeed, transformers; print("torch", torch.__version__, "triton", triton.__version__, "deepspeed", deepspeed.__version__, "transformers", transformers.__version__)'
} | tee "$out/device.txt"

check tests 100 "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_fused_kd.py tests/test_train.py tests/test_efficiency.py \
  -k "(cuda or triton or gpu or device) and not interpreter"
TAIL=24 check ablation_paper 210 "$PY" benchmarks/mfu_ablation.py --config ctcd_paper --steps "$STEPS" --warmup "$WARMUP" \
  --out "$out/ablation_paper" "${tok[@]}"
TAIL=30 check profile_paper 45 "$PY" benchmarks/profile_step.py --config ctcd_paper --steps 5 --warmup 3 \
  --out "$out/profile_paper" "${tok[@]}"
TAIL=8 check ablation_large 75 "$PY" benchmarks/mfu_ablation.py --config ctcd_large --only defaults --steps 10 --warmup 3 \
  --out "$out/ablation_large" "${tok[@]}"
TAIL=40 check kd_loss_bf16 40 "$PY" benchmarks/kd_loss.py --device cuda --dtype bf16 --rows 4096 16384 --vocab 30522 \
  --hidden 768 --reps 10 --no-compile

if [ "${#failed[@]}" -gt 0 ]; then
  echo "FAILED: ${failed[*]}"
  exit 1
fi
echo "all GPU checks passed; results in $out"
