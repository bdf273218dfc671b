#!/usr/bin/env bash
# Run stages of benchmarks/eval_qwen_gpu.sh on a GPU machine without internet, from files
# brought in by hand: the Qwen2.5-Coder-1.5B-Instruct GGUF, the gguf and rdata wheels and
# Jane Austen's texts (the janeaustenr data folder).
#
#   bash benchmarks/offline_gpu_session.sh GGUF WHEEL_DIR OUT STAGE [STAGE ...]
#
# GGUF: the model file (its sha256 is checked); WHEEL_DIR: a folder with gguf-*.whl,
# rdata-*.whl and janeaustenr/; OUT: results folder (kept between calls: stages resume).
# The stages that need no model (walktests, gputests, attention, attention_long) ignore GGUF
# and WHEEL_DIR (pass - for each).
# A stage may be any eval_qwen_gpu.sh stage, or
#   walktests  pytest -m gpu on the walk's tests (the bfloat16 products among them)
#   gputests   pytest -m gpu on the walk, query-row, core, RULER and decode tests
#   attention  benchmarks/attention.py prefill at 32K and 128K: the default preset's selection
#              (bfloat16 walk) and end-to-end time beside cuDNN, query rows 0 and 2, the
#              PyTorch query rows (auto) against their kernel (triton), profile of the last
#   attention_long  the same at 256K and 512K (one timed repetition)
#   zoo_attention   every peer selector's selection time beside SketchWalk's and cuDNN, 32K and
#              128K
# Environment: SECONDS_LIMIT and the RULER_* variables pass through to eval_qwen_gpu.sh.
set -euo pipefail
gguf=${1:?gguf}
wheels=${2:?wheel dir}
out=${3:?out}
shift 3
known=" walktests gputests attention attention_long zoo_attention gate setup ppl32 ppl16 small32 \
sweep32 niah multikey decode needles timing ruler_tune ruler_tune2 ruler_pins ruler_report ruler_ppl zoo_ppl zoo_ruler "
for stage in "$@"; do  # every stage checked before anything runs
  case "$known" in
    *" $stage "*) ;;
    *) echo "unknown stage $stage (one of:$known)" >&2; exit 2 ;;
  esac
done
want=cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046
log() { echo "$(date +%H:%M:%S) $*" | tee -a "$out/timeline.txt"; }
mkdir -p "$out"
site=/tmp/sketchwalk_site
export PYTHONPATH="$site:$PWD/src" SKETCHWALK_JANEAUSTENR_DIR=/tmp/sketchwalk_jane PYTHONUNBUFFERED=1
# the model, its converter's wheels and the texts: only for the stages that run the model
model_ready() {
  [ -f "$out/.model_ready" ] && return
  if [ ! -d "$site/gguf" ]; then
    pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$wheels"/*.whl
  fi
  [ -d /tmp/sketchwalk_jane ] || cp -r "$wheels/janeaustenr" /tmp/sketchwalk_jane
  got=$(sha256sum "$gguf" | cut -d' ' -f1)
  if [ "$got" != "$want" ]; then
    echo "$gguf: sha256 $got is not the Q4_K_M file's" >&2
    exit 1
  fi
  log "fetch"
  python3 -m sketchwalk models fetch qwen2.5-coder-1.5b --from_file "$gguf"
  log "setup"
  bash benchmarks/eval_qwen_gpu.sh setup "$out"
  touch "$out/.model_ready"
}
for stage in "$@"; do
  log "start $stage"
  rc=0
  case "$stage" in
    walktests)
      python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_walk.py \
        > "$out/gpu_tests_walk.txt" 2>&1 || rc=$?
      tail -n 20 "$out/gpu_tests_walk.txt"
      ;;
    gputests)
      python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_walk.py tests/test_query_rows.py \
        tests/test_triton_query_rows.py tests/test_core.py tests/test_ruler.py tests/test_decode.py \
        > "$out/gpu_tests.txt" 2>&1 || rc=$?
      tail -n 40 "$out/gpu_tests.txt"
      ;;
    attention)
      python3 benchmarks/attention.py --mode prefill --shapes llama --seq-lens 32768 131072 \
        --densities 0.1 0.2 --query-rows 0 2 --walk-dtypes bfloat16 \
        --select-backends auto triton --selectors --no-flex-sparse --profile-select \
        --rep 50 --out-dir "$out/attention" --tag "$(nvidia-smi --query-gpu=name \
        --format=csv,noheader | head -n1 | tr ' ' '_')" > "$out/attention.log" 2>&1 || rc=$?
      tail -n 150 "$out/attention.log"
      ;;
    zoo_attention)
      python3 benchmarks/attention.py --mode prefill --shapes llama --seq-lens 32768 131072 \
        --densities 0.1 0.2 --no-flex-sparse --rep 50 --out-dir "$out/zoo_attention" \
        --tag "$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n1 | tr ' ' '_')" \
        > "$out/zoo_attention.log" 2>&1 || rc=$?
      tail -n 60 "$out/zoo_attention.log"
      ;;
    attention_long)
      python3 benchmarks/attention.py --mode prefill --shapes llama --seq-lens 262144 524288 \
        --densities 0.1 0.2 --walk-dtypes float32 bfloat16 --select-backends auto triton \
        --selectors --no-flex-sparse \
        --warmup 1 --rep 1 --out-dir "$out/attention_long" --tag "$(nvidia-smi \
        --query-gpu=name --format=csv,noheader | head -n1 | tr ' ' '_')" \
        > "$out/attention_long.log" 2>&1 || rc=$?
      tail -n 80 "$out/attention_long.log"
      ;;
    gate)
      model_ready
      [ -f "$out/gate_qwen2.5-coder-1.5b/attn_gate_weights.pth" ] ||
        bash benchmarks/eval_qwen_gpu.sh gate "$out" || rc=$?
      ;;
    *)
      model_ready
      bash benchmarks/eval_qwen_gpu.sh "$stage" "$out" || rc=$?
      ;;
  esac
  log "end $stage rc=$rc"
done
