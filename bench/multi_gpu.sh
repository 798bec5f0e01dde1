#!/usr/bin/env bash
# The multi-GPU measurements (issues 27, 28 and 25) on one machine of two GPUs, from the
# repository root: bench/README.md, "Multi-GPU runbook", says what each step writes.
#
#   STEPS="27 28-handoff" bash bench/multi_gpu.sh        # on the device machine ($OUT set)
#   DRY=1 bash bench/multi_gpu.sh                         # print the commands only
#   CPU=1 OUT=/tmp/mg bash bench/multi_gpu.sh             # every step on the CPU, tiny settings
#
# Steps, in priority order (STEPS picks some; default all):
#   27           the cell's handoff GPU0 -> GPU1 at 16/512/2,048/8,192 tokens, torch copy beside
#   28-handoff   the same with the prefill engine at TP 2 and the decode engine at TP 1
#   28-tp1       bench/engine.py at TP 1: the baseline of 28-tp2, on this machine
#   28-tp2       bench/engine.py at TP 2 beside 28-tp1 (28-tp1 runs first when its JSON is missing)
#   25-long      serving, 1 prefill + 1 decode GPU against 2 colocated, ~4k tokens in, 256 out
#   25-chat      the same with a chat mix (~512 in, 256 out)
#   gpu-tests    tests/gpu: tensor parallelism and the cell on two GPUs
# "27", "28" and "25" name their groups. Every call installs the checkout (pip -e, no
# dependencies; wheels from $WHEELS first when set) and writes the 8B-shaped random
# checkpoint unless this machine already has it ($MODEL_DIR).
#
# Results: JSON and PNG per step in $RESULTS (default /tmp/multi_gpu, kept between calls on
# a warm machine), copied to $OUT at the end; one log, $OUT/multi_gpu.log, appended to.
# The device returns at most 8 files: past 7 results they go to $OUT as one tar.gz.
# Each step has its own time limit, cut to what is left of $BUDGET seconds (default 570:
# a device command may run 10 minutes), so that the copy to $OUT still happens.

set -o pipefail
cd "$(dirname "$0")/.." || exit 2

DRY=${DRY:-0}
CPU=${CPU:-0}
OUT=${OUT:-/tmp/multi_gpu-out}
RESULTS=${RESULTS:-/tmp/multi_gpu}
BUDGET=${BUDGET:-570}
if [ "$CPU" = 1 ]; then MODEL_DIR=${MODEL_DIR:-/tmp/multi_gpu-small8b}; else MODEL_DIR=${MODEL_DIR:-/tmp/llama31-8b-random}; fi
STEPS_GIVEN=${STEPS:-"27 28 25 gpu-tests"}
STEPS=()  # the groups expanded, in the order given
for s in $STEPS_GIVEN; do
    case $s in
        28) STEPS+=(28-handoff 28-tp1 28-tp2) ;;
        25) STEPS+=(25-long 25-chat) ;;
        27|28-handoff|28-tp1|28-tp2|25-long|25-chat|gpu-tests) STEPS+=("$s") ;;
        *) echo "multi_gpu.sh: unknown step '$s' (27 28 25 28-handoff 28-tp1 28-tp2 25-long 25-chat gpu-tests)" >&2
           exit 2 ;;
    esac
done

# NVLink multicast stays off (the device machines' rule); logs unbuffered.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
if [ "$DRY" != 1 ]; then
    mkdir -p "$OUT" "$RESULTS" || exit 2
    exec > >(tee -a "$OUT/multi_gpu.log") 2>&1
fi
echo "multi_gpu.sh $(date -u +%FT%TZ): steps ${STEPS[*]}; results $RESULTS -> $OUT; model $MODEL_DIR"
STATUS=()

# show COMMAND...: the command as it can be pasted (arguments with spaces in single quotes).
show() {
    local a out=""
    for a in "$@"; do [[ $a =~ [[:space:]] ]] && out+="'$a' " || out+="$a "; done
    echo "${out% }"
}

# run NAME LIMIT_S COMMAND...: one step under `timeout`, its time and exit status recorded.
run() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - SECONDS - 15))
    if [ "$DRY" = 1 ]; then
        echo "[$name, limit ${limit}s]"
        echo "  $(show "$@")"
        return 0
    fi
    if [ "$left" -lt 30 ]; then
        echo "=== $name: skipped, ${left}s of the budget left"; STATUS+=("$name skipped"); return 1
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "=== $name (limit ${limit}s) $(date -u +%FT%TZ): $(show "$@")"
    local t0=$SECONDS rc
    timeout -k 20 "$limit" "$@"
    rc=$?
    echo "=== $name: exit $rc after $((SECONDS - t0))s"
    STATUS+=("$name rc=$rc $((SECONDS - t0))s")
    return $rc
}

finish() {
    [ "$DRY" = 1 ] && return
    echo "=== summary: ${STATUS[*]}"
    # This call's results to $OUT: loose when they fit the device's 8 files, else one tar.
    mapfile -t new < <(find "$RESULTS" -maxdepth 1 -type f -newer "$MARK" \( -name '*.json' -o -name '*.png' \) | sort)
    if [ "${#new[@]}" -le 7 ]; then
        [ "${#new[@]}" -gt 0 ] && cp "${new[@]}" "$OUT"/
    else
        tar -czf "$OUT/multi_gpu-results.tar.gz" -C "$RESULTS" "${new[@]##*/}"
    fi
    rm -f "$MARK"
    ls -l "$OUT"
}
MARK=$(mktemp)
trap finish EXIT

# -- setup --------------------------------------------------------------------------------
if [ "$CPU" = 1 ]; then
    DEVICE=(--device cpu)
    run checkpoint 120 python3 bench/engine_workload.py "$MODEL_DIR" --small --device cpu
else
    DEVICE=(--device cuda)
    if [ -n "$WHEELS" ]; then
        run wheels 180 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site "$WHEELS"/*.whl || exit 1
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    run install 180 python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
    [ "$DRY" = 1 ] || { nvidia-smi; nvidia-smi topo -m; python3 -c 'import torch; print("torch", torch.__version__, "GPUs", torch.cuda.device_count())'; }
    run checkpoint 300 python3 bench/engine_workload.py "$MODEL_DIR" || exit 1
fi

# -- the steps ----------------------------------------------------------------------------
if [ "$CPU" = 1 ]; then  # the same paths with tiny settings (no second device: --gpus left out)
    TAG=cpu
    CELL=(--tokens 16,256 --reps 3)
    CELL_TP=(--prefill-tp 2 --tokens 16,256 --reps 3)
    ENGINE=(--decode-batches 1,8 --decode-context 64 --prefill-lengths 128 --batch1-new-tokens 8 --requests 4
            --warmup-requests 1)
    UP="--model $MODEL_DIR --device cpu --transport auto --max-model-len 8192 --num-gpu-blocks-override 1024"
    LONG=(--prompt-len 512 --prompt-len-spread 0.1 --output-len 16 --request-rates 2,4 --num-requests 8)
    CHAT=(--prompt-len 128 --prompt-len-spread 0.5 --output-len 16 --request-rates 4,8 --num-requests 8)
else
    TAG=2gpu
    CELL=(--gpus 2 --tokens 16,512,2048,8192 --reps 20 --model-dir "$MODEL_DIR")
    CELL_TP=(--gpus 2 --prefill-tp 2 --tokens 512,2048,8192 --reps 10 --model-dir "$MODEL_DIR")
    ENGINE=(--decode-batches 1,8,64,256 --prefill-lengths 512,2048,8192 --model-dir "$MODEL_DIR")
    UP="--model $MODEL_DIR --device cuda --transport auto --max-model-len 8192"
    LONG=(--prompt-len 4096 --prompt-len-spread 0.1 --output-len 256 --request-rates 2,4,6,8 --num-requests 80)
    CHAT=(--prompt-len 512 --prompt-len-spread 0.5 --output-len 256 --request-rates 4,8,16,32 --num-requests 160)
fi
ENGINE+=(--sections batch1,decode,prefill,offline --hf-requests 0)
SERVING=(--up-args "$UP" --disaggregated-args "--prefill 1 --decode 1" --colocated-args "--colocated 2"
         --max-concurrency 256 --slo-ttft 0.5 --slo-tpot 0.03)

for step in "${STEPS[@]}"; do
    case $step in
    27) run 27 420 python3 bench/kv_cell.py "${DEVICE[@]}" "${CELL[@]}" --out "$RESULTS/kv_cell-$TAG.json" ;;
    28-handoff) run 28-handoff 420 python3 bench/kv_cell.py "${DEVICE[@]}" "${CELL_TP[@]}" \
                    --out "$RESULTS/kv_cell-$TAG-prefill-tp2.json" ;;
    28-tp1) run 28-tp1 300 python3 bench/engine.py "${DEVICE[@]}" "${ENGINE[@]}" --out "$RESULTS/engine-tp1.json" ;;
    28-tp2)
        if [ "$DRY" != 1 ] && [ ! -s "$RESULTS/engine-tp1.json" ]; then  # the baseline: this machine's
            echo "=== 28-tp2: no $RESULTS/engine-tp1.json on this machine: 28-tp1 first"
            run 28-tp1 300 python3 bench/engine.py "${DEVICE[@]}" "${ENGINE[@]}" --out "$RESULTS/engine-tp1.json"
        fi
        run 28-tp2 420 python3 bench/engine.py "${DEVICE[@]}" "${ENGINE[@]}" --tensor-parallel-size 2 \
            --baseline "$RESULTS/engine-tp1.json" --out "$RESULTS/engine-tp2.json" ;;
    25-long) run 25-long 570 python3 bench/serving.py "${SERVING[@]}" --mix long "${LONG[@]}" \
                 --out "$RESULTS/serving-long.json" ;;
    25-chat) run 25-chat 570 python3 bench/serving.py "${SERVING[@]}" --mix chat "${CHAT[@]}" \
                 --out "$RESULTS/serving-chat.json" ;;
    gpu-tests) run gpu-tests 420 python3 -m pytest -q -m gpu --tb=short -p no:cacheprovider \
                   tests/gpu/test_tensor_parallel_cuda.py tests/gpu/test_cell_cuda.py ;;
    esac
done
for s in "${STATUS[@]}"; do case $s in *rc=0*) ;; *) exit 1 ;; esac; done
exit 0
