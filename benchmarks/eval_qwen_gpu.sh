#!/usr/bin/env bash
# The long-context evaluation of sketchwalk on a GPU: Qwen2.5-Coder-1.5B-Instruct (32K context),
# real Jane Austen text, perplexity and needle retrieval for every selector at matched density,
# the learned SeerAttention gate, time to first token and decode speed.
#
#   bash benchmarks/eval_qwen_gpu.sh STAGE [OUT]
#
# STAGE: setup | gate | ppl32 | ppl16 | small32 | sweep32 | niah | multikey | decode | needles |
# timing | ruler_tune | ruler_tune2 | ruler_pins | ruler_report | ruler_ppl | zoo_ppl | zoo_ruler
# (each resumes where it stopped; the ruler stages take SECONDS_LIMIT=N in the environment as a time limit, then run
# again to finish; RULER_SAMPLES, RULER_TASKS, RULER_LENGTHS override their sizes). OUT
# (default results/eval_qwen) receives the JSON, markdown tables and plots. The model must have been fetched first:
#   sketchwalk models fetch qwen2.5-coder-1.5b        (or --from_file PATH)
# Text: Jane Austen's novels (Debian's r-cran-janeaustenr, or SKETCHWALK_JANEAUSTENR_DIR).
set -euo pipefail
stage=${1:?stage}
out=${2:-results/eval_qwen}
mkdir -p "$out"
sw() { python3 -m sketchwalk "$@"; }
# limit ARGS...: run `sketchwalk ARGS` for at most $SECONDS_LIMIT seconds (when set); a run cut short keeps
# every finished item (atomic writes) and the next call with --resume continues it.
limit() {
  if [ -z "${SECONDS_LIMIT:-}" ]; then sw "$@"; return; fi
  local rc=0
  timeout --signal=INT "$SECONDS_LIMIT" python3 -m sketchwalk "$@" || rc=$?
  if [ "$rc" -eq 124 ]; then echo "time limit reached; run the stage again to continue" >&2; fi
  [ "$rc" -eq 0 ] || [ "$rc" -eq 124 ]
}
model=(--model_path qwen2.5-coder-1.5b --device cuda --text_source austen --no_progress --resume)
gate="$out/gate_qwen2.5-coder-1.5b"
# The variants the defaults are chosen from (docs/eval.md, README "Evidence for the defaults").
small="sink_blocks=1,window_blocks=2,dense_last_rows=0"
variants=(
  --variant "paper:preset=paper"
  --variant "kv_small:granularity=kv_group,$small"
  --variant "kv_small_global:granularity=kv_group,$small,allocation=global"
  --variant "head_small:granularity=head,$small"
  --variant "kv_mass90:granularity=kv_group,$small,mass=0.9"
  --variant "kv_mass95:granularity=kv_group,$small,mass=0.95"
)
case "$stage" in
  setup)
    python3 -c "from sketchwalk.hf.models import load_model; load_model('qwen2.5-coder-1.5b', device='cuda')"
    ;;
  gate)
    sw train-gate --model_path qwen2.5-coder-1.5b --device cuda --dtype bfloat16 \
      --seq_lengths 8192 16384 --num_samples 4 --heldout_samples 1 --steps 300 --seed 100 \
      --output_dir "$gate" --no_progress
    ;;
  ppl32 | ppl16)
    T=$([ "$stage" = ppl32 ] && echo 32000 || echo 16000)
    sw eval ppl "${model[@]}" --seq_len "$T" --num_samples 2 --densities 0.1 0.2 0.3 \
      --selectors dense sketchwalk oracle streaming forced gate --gate_path "$gate" \
      "${variants[@]}" --output_dir "$out/ppl_$T"
    ;;
  small32)
    # every baseline again at the budget of the small-forced per-KV-group configuration
    sw eval ppl "${model[@]}" --seq_len 32000 --num_samples 2 --densities 0.1 0.2 0.3 \
      --granularity kv_group --sink_blocks 1 --window_blocks 2 --dense_last_rows 0 \
      --selectors sketchwalk oracle streaming forced gate --gate_path "$gate" \
      --output_dir "$out/ppl_32000_kv_small"
    ;;
  sweep32)
    # the selection knobs at the default preset's budget, densities 0.1 and 0.2 (README,
    # "Evidence for the defaults"); head_aggregation=max runs the reference transition
    sw eval ppl "${model[@]}" --seq_len 32000 --num_samples 2 --densities 0.1 0.2 \
      --selectors dense sketchwalk \
      --variant "agg_max:head_aggregation=max" \
      --variant "agg_max_sharp2:head_aggregation=max,sparsity_exponent=2" \
      --variant "sharp2:sparsity_exponent=2" --variant "sharp4:sparsity_exponent=4" \
      --variant "temp_half:temperature=0.390625" --variant "temp_double:temperature=1.5625" \
      --variant "no_walk:walk=false" --variant "damping_half:damping=0.5" \
      --variant "per_head:granularity=head" --variant "global:allocation=global" \
      --variant "window4:window_blocks=4" \
      --output_dir "$out/sweep_32000"
    ;;
  niah)
    # single needle: every selector, prefill-only and prefill + decode sparse
    sw eval niah "${model[@]}" --seq_lens 16000 32000 --depths 10 50 90 \
      --num_samples 1 --densities 0.1 0.2 0.3 --selectors dense sketchwalk oracle streaming gate \
      --gate_path "$gate" --variant "paper:preset=paper" --decode dense sketchwalk \
      --output_dir "$out/niah"
    ;;
  multikey)
    # four needles with different keys, one asked for
    sw eval niah "${model[@]}" --task multikey --num_needles 4 --seq_lens 16000 32000 \
      --depths 10 50 90 --num_samples 1 --densities 0.1 0.2 \
      --selectors dense sketchwalk oracle streaming gate --gate_path "$gate" \
      --decode dense sketchwalk --output_dir "$out/multikey"
    ;;
  decode)
    # prefill + decode both sparse: the released-style decode rule against the query-aware one
    sw eval niah "${model[@]}" --seq_lens 16000 32000 --depths 10 30 50 70 90 \
      --num_samples 1 --densities 0.1 0.2 --selectors dense \
      --variant "walk:granularity=kv_group,$small,decode_rule=walk" \
      --variant "quest_rule:granularity=kv_group,$small,decode_rule=quest" \
      --variant "default_walk:decode_rule=walk" --decode sketchwalk \
      --output_dir "$out/niah_decode"
    ;;
  needles)
    # needles with prefill-only and prefill+decode sparse, both decode rules, in one run
    sw eval niah "${model[@]}" --seq_lens 16000 32000 --depths 10 50 90 \
      --num_samples 1 --densities 0.1 0.2 --selectors dense sketchwalk oracle streaming \
      --variant "kv_small:granularity=kv_group,$small,decode_rule=walk" \
      --variant "kv_quest:granularity=kv_group,$small,decode_rule=quest" \
      --decode dense sketchwalk --output_dir "$out/needles"
    ;;
  timing)
    sw eval ppl "${model[@]}" --seq_len 32000 --num_samples 1 --densities 0.1 0.2 \
      --selectors dense sketchwalk --variant "quest_rule:granularity=kv_group,$small,decode_rule=quest" \
      --timing --timing_decode_tokens 64 --output_dir "$out/timing_32000"
    ;;
  ruler_tune)
    # Choosing the default preset's handling of the last rows on the TUNE split (prompts,
    # values and filler disjoint from the report split): both prefill and decode sparse.
    limit eval ruler "${model[@]}" --split tune --seq_lens 32000 \
      --num_samples "${RULER_TUNE_SAMPLES:-4}" --densities 0.1 --selectors dense \
      --tasks niah_single_2 niah_single_3 niah_multikey_1 niah_multikey_2 niah_multivalue vt \
      --variant "walk_rows:query_rows=0,query_tokens=0" \
      --variant "query_rows2:query_rows=2,query_tokens=0" --variant "query_rows4:query_rows=4" \
      --variant "dense_rows4:query_rows=0,query_tokens=0,dense_last_rows=4" \
      --decode sketchwalk --output_dir "$out/ruler_tune"
    ;;
  ruler_tune2)
    # Where the default still loses at 0.1 (tune split, 32K): prefill-only against both sparse
    # (does decoding lose it?), the oracle at the same budget, a wider window, more question
    # rows, more budget for the question rows at the same density, and a score-following
    # budget; 8 prompts per task, 8 per generate() call.
    limit eval ruler "${model[@]}" --split tune --seq_lens 32000 \
      --num_samples "${RULER_TUNE_SAMPLES:-8}" --densities 0.1 --selectors dense sketchwalk oracle \
      --tasks niah_single_2 niah_single_3 niah_multikey_1 niah_multikey_2 niah_multivalue vt \
      --variant "window4:window_blocks=4" --variant "query_rows4:query_rows=4" \
      --variant "mass95:mass=0.95" --variant "qbudget4:query_rows_budget=4" \
      --decode dense sketchwalk --batch_size 8 --output_dir "$out/ruler_tune2"
    ;;
  ruler_pins)
    # Decode steps that keep the blocks the question attends to most (decode_pin_blocks), tune
    # split, 32K, prefill and decode sparse (pins change decoding only); 8 prompts per task.
    limit eval ruler "${model[@]}" --split tune --seq_lens 32000 \
      --num_samples "${RULER_TUNE_SAMPLES:-8}" --densities 0.1 0.2 --selectors dense sketchwalk \
      --tasks niah_single_2 niah_single_3 niah_multikey_1 niah_multikey_2 niah_multivalue vt \
      --variant "pin4:decode_pin_blocks=4" --variant "pin16:decode_pin_blocks=16" \
      --decode sketchwalk --batch_size 8 --output_dir "$out/ruler_pins"
    ;;
  ruler_report)
    # The report split (held out: the defaults were chosen on the tune split): every selector
    # at matched density, prefill and decode sparse, 24 prompts per cell, 8 prompts per
    # generate() call; each prompt up to 63 tokens shorter than the length (drawn per round:
    # prompts end anywhere in a block, unlike the tune split's block-aligned ones).
    # RULER_SELECTORS / RULER_DENSITIES / RULER_BATCH / RULER_JITTER override.
    limit eval ruler "${model[@]}" --split report --length_jitter "${RULER_JITTER:-63}" \
      --seq_lens ${RULER_LENGTHS:-32000} --num_samples "${RULER_SAMPLES:-24}" \
      --tasks ${RULER_TASKS:-niah_single_1 niah_single_2 niah_single_3 niah_multikey_1 \
        niah_multikey_2 niah_multikey_3 niah_multivalue niah_multiquery vt cwe fwe} \
      --densities ${RULER_DENSITIES:-0.1 0.2} \
      --selectors ${RULER_SELECTORS:-dense sketchwalk oracle streaming gate} --gate_path "$gate" \
      --batch_size "${RULER_BATCH:-8}" --decode sketchwalk \
      --output_dir "$out/ruler_report${RULER_SUFFIX:-}"
    ;;
  ruler_ppl)
    # perplexity of the same configurations at 32K (two passages)
    sw eval ppl "${model[@]}" --seq_len 32000 --num_samples 2 --densities 0.1 0.2 \
      --selectors dense sketchwalk oracle streaming --variant "walk_rows:query_rows=0,query_tokens=0" \
      --variant "qbudget4:query_rows_budget=4" \
      --output_dir "$out/ruler_ppl_32000"
    ;;
  zoo_ppl)
    # every selector at matched density (issue table: perplexity column)
    sw eval ppl "${model[@]}" --seq_len 32000 --num_samples 2 --densities 0.1 0.2 \
      --selectors dense sketchwalk oracle streaming xattention minference flexprefill \
      --variant "paper:preset=paper" --output_dir "$out/zoo_ppl_32000"
    ;;
  zoo_ruler)
    # every selector on the report split, prefill and decode sparse (task average column)
    limit eval ruler "${model[@]}" --split report --seq_lens 32000 \
      --num_samples "${RULER_SAMPLES:-8}" --densities 0.1 0.2 \
      --tasks ${RULER_TASKS:-niah_single_2 niah_multikey_1 niah_multikey_2 niah_multivalue \
        niah_multiquery vt} \
      --selectors dense sketchwalk oracle streaming xattention minference flexprefill \
      --variant "paper:preset=paper" --decode sketchwalk --output_dir "$out/zoo_ruler"
    ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
