#!/usr/bin/env bash
# The GPU runs of issues 5 and 6 in one go, from the repository root: `bash bench/gpu_run.sh [all|mfu]`.
# all (default): the train and decode benchmarks at both shapes. mfu: the 3B training step's MFU: batch 16
# traced (bench/trace_summary.py) with its optimized HLO dumped, then variants (XLA's Triton GEMMs off;
# batch 24, and 32 and 48 with remat, under the better flags), then the best of them against transformers.
# Installs the wheels carried in .whl/ (the packages the GPU image lacks), prints the machine, then runs
# each benchmark in its own process under a timeout, its output in "$OUT"/<name>.log, going on after a
# failure. No run starts once BUDGET_S seconds (default 420) have passed since the start, and none runs
# past that; the end prints the last JSON line of each (also in "$OUT"/summary.txt).
set -uo pipefail
OUT=${OUT:-/tmp/out}
BUDGET_S=${BUDGET_S:-420}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
check='import flax, jax; from flax import nnx; import bbu_jax.training.program, bbu_jax.decode.generate'
if ! python3 -c "$check"; then
  echo "bbu_jax does not import with the carried flax: trying the machine's own"
  rm -rf /tmp/site/flax /tmp/site/flax-*.dist-info
  python3 -c "$check" || echo "bbu_jax does not import: the runs below will fail"
fi
{
  nvidia-smi
  python3 -c 'import sys, jax, flax, optax, torch, transformers
print(sys.version.split()[0], "jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__,
      "torch", torch.__version__, "transformers", transformers.__version__)
print(jax.devices(), torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA for torch")'
} 2>&1 | tee "$OUT/env.log"

run() {  # name max_seconds script args...
  local name=$1 limit=$2 left rc
  shift 2
  left=$((BUDGET_S - SECONDS))
  if ((left < 45)); then
    echo "== $name: not run, ${left}s of the ${BUDGET_S}s budget left" | tee "$OUT/$name.log"
    return
  fi
  ((limit > left)) && limit=$left
  echo "== $name (timeout ${limit}s, ${SECONDS}s so far): $*"
  timeout -k 10 "$limit" python3 "$@" 2>&1 | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc at ${SECONDS}s" | tee -a "$OUT/$name.log"
}

summary() {  # the last JSON line of each run in names (also in $OUT/summary.txt, with the full figures)
  echo "== summary after ${SECONDS}s (full figures: the line before each in $OUT/<name>.log)" | tee "$OUT/summary.txt"
  for name in "${names[@]}"; do
    [ -f "$OUT/$name.log" ] || continue
    line=$(grep '^{' "$OUT/$name.log" | tail -n 1)
    echo "$name: ${line:-no JSON; $(tail -n 1 "$OUT/$name.log")}" | tee -a "$OUT/summary.txt"
    grep '^{' "$OUT/$name.log" | tail -n 2 | head -n 1 >>"$OUT/summary.txt"
  done
}

best_of() {  # the name of the run (among the arguments) whose last JSON line has the highest "mfu"
  for name in "$@"; do
    grep '^{' "$OUT/$name.log" 2>/dev/null | tail -n 1 | python3 -c "import json, sys
line = sys.stdin.read().strip()
print(json.loads(line).get('mfu') or 0 if line else 0, '$name')"
  done | sort -g | tail -n 1 | cut -d' ' -f2
}

if [[ ${1:-all} == mfu ]]; then
  names=(mfu_b16 mfu_b16_no_triton_gemm mfu_b24 mfu_b32_remat mfu_b48_remat mfu_best_vs_hf)
  train=(bench/bench_train.py --shape 3b --dtype bfloat16 --skip_hf --warmup 2 --steps 5)
  run mfu_b16 150 "${train[@]}" --batch 16 --profile "$OUT/trace" \
    --xla_flags="--xla_dump_to=$OUT/hlo --xla_dump_hlo_module_re=.*train_step.* --xla_dump_hlo_as_text"
  python3 bench/trace_summary.py "$OUT/trace" --top 30 2>&1 | tee "$OUT/trace_summary.log"
  run mfu_b16_no_triton_gemm 100 "${train[@]}" --batch 16 --xla_flags="--xla_gpu_enable_triton_gemm=false"
  flags=""  # the larger batches run with the better of the two
  [[ $(best_of mfu_b16 mfu_b16_no_triton_gemm) == mfu_b16_no_triton_gemm ]] && flags="--xla_gpu_enable_triton_gemm=false"
  run mfu_b24 100 "${train[@]}" --batch 24 --xla_flags="$flags"
  run mfu_b32_remat 110 "${train[@]}" --batch 32 --remat dots_with_no_batch_dims_saveable --xla_flags="$flags"
  run mfu_b48_remat 110 "${train[@]}" --batch 48 --remat dots_with_no_batch_dims_saveable --xla_flags="$flags"
  best=$(best_of mfu_b16 mfu_b16_no_triton_gemm mfu_b24 mfu_b32_remat mfu_b48_remat)
  args=$(grep '^{' "$OUT/$best.log" | tail -n 2 | head -n 1 | python3 -c "import json, sys
f = json.load(sys.stdin)
flags = [flag for flag in f['xla_flags'].split() if not flag.startswith('--xla_dump')]
print('--batch', f['batch'], '--remat', f['remat'], '--xla_flags=' + ' '.join(flags))")
  echo "best: $best ($args)"
  # shellcheck disable=SC2086
  run mfu_best_vs_hf 200 bench/bench_train.py --shape 3b --dtype bfloat16 --warmup 2 --steps 5 $args
  summary
  grep -v '^{' "$OUT/trace_summary.log" | cut -c1-200
  # At most 8 files come back from the device tool: the logs, the trace and the train step's optimized
  # HLO go into one archive.
  (cd "$OUT" && tar czf mfu_files.tgz --exclude='*.xplane.pb' --exclude='*before_optimizations*' -- *.log trace hlo \
     && rm -rf trace hlo mfu_*.log trace_summary.log)
  exit 0
fi

names=(train_3b train_bench decode_bench decode_3b train_3b_batch16)
run train_3b 240 bench/bench_train.py --shape 3b --dtype bfloat16 --warmup 2 --steps 5
run train_bench 100 bench/bench_train.py --shape bench --dtype bfloat16
run decode_bench 90 bench/bench_decode.py --shape bench --dtype bfloat16
run decode_3b 150 bench/bench_decode.py --shape 3b --dtype bfloat16
# Only on a card of 120 GB or more (H200) and where time is left: the 3B step at a 4x larger batch, where
# the optimizer's pass over the ~60 GB of weights and moments weighs less.
memory_mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -n 1)
[[ $memory_mib =~ ^[0-9]+$ ]] || memory_mib=0
if ((memory_mib >= 120000 && BUDGET_S - SECONDS >= 150)); then
  run train_3b_batch16 150 bench/bench_train.py --shape 3b --dtype bfloat16 --batch 16 --warmup 2 --steps 5
fi

summary
