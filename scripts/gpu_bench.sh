#!/usr/bin/env bash
# The GPU benchmarks of BENCHMARKS.md in one run, at most 8 minutes on one H200:
#   1. GPT-2-large config, batch 2 x 512, eager, bf16 autocast: every training mode, each in its own process,
#      with torch.profiler tables (gpt2-large-eager.{md,json,profile.md})
#   2. GPT-2 small config, batch 8 x 1024, torch.compile, bf16 autocast: the goal's modes, each in its own
#      process (gpt2-small-compile.{md,json})
#   3. inference, GPT-2 small config: forward of batch 8 x 1024 and generate() of 128 new tokens with the KV
#      cache at batch 1 and 8, bf16 autocast, eager (gpt2-small-inference.{md,json}); its modes share one
#      process (GPU memory is measured per mode anyway; isolating would spend ~10 s of imports per mode)
# plus env.txt (GPU, driver, versions) and summary.md (each stage's status and table).
#
# Usage: scripts/gpu_bench.sh [--dry-run] [FOLDER]
#   FOLDER defaults to $OUT (the device machine's output folder), else ./gpu_bench_out.
#   --dry-run runs the same stages CPU-sized (tiny configs, fp32, no compile, modes in one process), to check
#   the script without a GPU (tests/test_bench.py does).
#   PYTHON picks the interpreter (default: python, else python3).
# Each stage has a wall-clock limit (timeout kills its whole process group), so the run ends in time even if a
# stage hangs; summary.md then says which stage timed out. The bench rewrites its files after every mode, so
# a stage that times out still leaves the modes it finished. A failed stage does not stop the next.
set -u -o pipefail

dry_run=0
if [ "${1:-}" = "--dry-run" ]; then
    dry_run=1
    shift
fi
folder="${1:-${OUT:-gpu_bench_out}}"
mkdir -p "$folder"
folder="$(cd "$folder" && pwd)"  # absolute: the stages run from the repository root
cd "$(dirname "$0")/.."
python="${PYTHON:-$(command -v python || command -v python3)}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

training_modes=full,frozen,lora,etf-orthogonal,etf-structured,etf-structured-dense,ffn-activation-only,ffn-free
compiled_modes=full,etf-structured,ffn-activation-only,ffn-free
inference_modes=full,etf-orthogonal,etf-structured,ffn-activation-only,ffn-free

if [ "$dry_run" = 1 ]; then
    device=(--device cpu --dtype fp32 --threads 1)
    large=(--size tiny --batch 2 --seq 16)
    small=(--size tiny --batch 2 --seq 32)
    steps=(--steps 2 --warmup 1)
    compile=()
    isolate=()
    generate=(--new-tokens 8 --prompt 4 --gen-batches 1,8 --gen-repeats 1)
    limits=(300 300 300)
else
    device=(--device cuda --dtype bf16)
    large=(--size large --batch 2 --seq 512)
    small=(--size small --batch 8 --seq 1024)
    steps=(--steps 10 --warmup 3)
    compile=(--compile)
    isolate=(--isolate)
    generate=(--new-tokens 128 --prompt 32 --gen-batches 1,8 --gen-repeats 3)
    # seconds, 460 in all (under 8 minutes with the environment report); estimates, not measurements: ~20 s per
    # isolated GPT-2-large mode, ~45 s per compiled GPT-2-small mode, ~12 s per inference mode
    limits=(160 200 100)
fi

{
    echo "started: $(date -u '+%Y-%m-%d %H:%M:%S UTC')  dry run: $dry_run"
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    "$python" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'| transformers', transformers.__version__)"
    "$python" -c "import peft; print('peft', peft.__version__)" 2>/dev/null || echo "peft: not installed (lora skipped)"
} > "$folder/env.txt" 2>&1

summary="$folder/summary.md"
echo "# GPU benchmark run ($(date -u '+%Y-%m-%d %H:%M UTC'), dry run: $dry_run)" > "$summary"

# stage NAME LIMIT_S ARGS...: one bench invocation writing NAME.md, NAME.json and NAME.log under the folder.
stage() {
    local name="$1" limit="$2"
    shift 2
    local started=$SECONDS
    echo "== $name (limit ${limit}s)"
    timeout --kill-after=10 "$limit" "$python" -m etf_hf.app.bench "$@" --quiet \
        --json "$folder/$name.json" --markdown "$folder/$name.md" > "$folder/$name.log" 2>&1
    local status=$? elapsed=$((SECONDS - started))
    if [ $status = 0 ]; then
        printf '\n## %s: ok (%ss)\n\n' "$name" "$elapsed" >> "$summary"
        cat "$folder/$name.md" >> "$summary"
    elif [ $status = 124 ] || [ $status = 137 ]; then
        printf '\n## %s: TIMED OUT after %ss (limit %ss); see %s.log\n' "$name" "$elapsed" "$limit" "$name" >> "$summary"
    else
        printf '\n## %s: FAILED (exit %s, %ss); last lines of %s.log:\n\n```\n%s\n```\n' "$name" "$status" \
            "$elapsed" "$name" "$(tail -n 20 "$folder/$name.log")" >> "$summary"
    fi
    echo "   exit $status after ${elapsed}s"
}

stage gpt2-large-eager "${limits[0]}" --family gpt2 "${large[@]}" "${device[@]}" "${steps[@]}" ${isolate[@]+"${isolate[@]}"} \
    --modes "$training_modes" --no-checkpoint --profile "$folder/gpt2-large-eager.profile.md" --profile-steps 3
stage gpt2-small-compile "${limits[1]}" --family gpt2 "${small[@]}" "${device[@]}" "${steps[@]}" ${compile[@]+"${compile[@]}"} \
    ${isolate[@]+"${isolate[@]}"} --modes "$compiled_modes" --no-checkpoint
stage gpt2-small-inference "${limits[2]}" --family gpt2 "${small[@]}" "${device[@]}" "${steps[@]}" \
    --inference "${generate[@]}" --modes "$inference_modes"

echo "finished: $(date -u '+%Y-%m-%d %H:%M:%S UTC')" >> "$folder/env.txt"
cat "$summary"
