#!/usr/bin/env bash
# The offline temporal demo on a CPU (2 cores, no internet), from a clean checkout:
#   the synthetic temporal suite (timed events on long low-fps clips) → tokenizer → the seeded
#   RANDOM open_clip tower of scripts/demo.sh → CLIP features of frames sampled at SAMPLE_FPS a
#   second (at most FRAME_CAP), two visual tokens per SEGMENT_SECONDS → pretrain (captions with times) → video SFT → eval, the model with
#   absolute-time embeddings (--time_encoding seconds); beside it, each in a lane of its own, the same two
#   stages and eval for each ablation: `mean` (frame average) and `no_time` (temporal summary without
#   any time embedding: the tokens' order is all it has) → out/temporal/report.md, out/temporal/metrics.json (+ PNGs).
# There is no image stage: the temporal suite has no images. ORACLE=1 trains and scores on each sampled
# frame's true scene state instead of its CLIP features (scripts/oracle_features.py): everything but perception.
# Step times and peak memory go to out/temporal/demo_times.json, the settings to out/temporal/demo_settings.json.
#
#   bash scripts/demo_temporal.sh
#   N_VIDEOS=24 N_TEST=12 MAX_SECONDS=12 PRE_EPOCHS=1 VID_EPOCHS=1 DIM=64 SUMMARY_DIM=64 bash scripts/demo_temporal.sh   # smoke run
set -euo pipefail

# ============================ settings (env-overridable) =============================
# --- data (scripts/make_temporal.py; pair members come on top of the counts)
N_VIDEOS=${N_VIDEOS:-3000}      # training videos
N_TEST=${N_TEST:-100}           # test videos
SEED=${SEED:-0}                 # dataset seed
MIN_SECONDS=${MIN_SECONDS:-4}   # shortest clip
MAX_SECONDS=${MAX_SECONDS:-60}  # longest training clip
TEST_MAX_SECONDS=${TEST_MAX_SECONDS:-$(( 2 * ${MAX_SECONDS%.*} ))}   # longest test clip (longer than any seen)
VIDEO_FPS=${VIDEO_FPS:-4}       # frames a second in the files
VIDEO_SIZE=${VIDEO_SIZE:-64}    # frame side in pixels
ORDER_QUESTIONS=${ORDER_QUESTIONS:-1}   # order questions of each form per training conversation (README)
ORDER_ANSWERS=${ORDER_ANSWERS:-restate}   # "after <the anchor>. Answer: ..."; event: the event alone; timeline (README)
OFFSET_SHARE=${OFFSET_SHARE:-0}   # share of training clips read as windows of a longer recording, clock up to TEST_MAX_SECONDS (README)
# --- the visual path
SAMPLE_FPS=${SAMPLE_FPS:-1}     # frames sampled a second of video
FRAME_CAP=${FRAME_CAP:-128}     # at most this many frames per video (longer videos: spread evenly)
SEGMENT_SECONDS=${SEGMENT_SECONDS:-1}   # an appearance and a motion token per this many seconds of video...
K=${K:-256}                     # ...at most this many visual tokens per video (0 s segments: exactly K)
TIME_TEXT=${TIME_TEXT:-0}       # 1: the model's segments also follow their start second as text (" 37"; README)
REGIONS=${REGIONS:-0}           # g > 0: each frame's feature also holds its patch tokens' means over a g x g grid (README)
CLIP_SIZE=${CLIP_SIZE:-64}      # the tower's input side: the videos' own (scripts/demo.sh: 128; README)
ORACLE=${ORACLE:-0}             # 1: train and score on each frame's true scene state, not the tower's features (README)
# --- training
BS=${BS:-8}                     # more, smaller steps: the suite underfits (README)
PRE_EPOCHS=${PRE_EPOCHS:-2}
VID_EPOCHS=${VID_EPOCHS:-3}
LAYERS=${LAYERS:-4}             # the LM's depth (scripts/demo.sh: 2); 4 fit the suite's questions better (README)
# --- shared with scripts/demo.sh (scripts/lib/demo_parts.sh; the same random tower at CLIP_SIZE): CLIP_MODEL
#     VISION_SEED SUMMARY_DIM VOCAB DIM HEADS KV PRE_LR SFT_LR TRAIN_SEED VAL_EVERY EXTRA_TRAIN_ARGS
# --- switches
ABLATIONS=${ABLATIONS-mean no_time}     # space-separated, any of: mean no_time ("" runs the model alone)
FRESH_DATA=${FRESH_DATA:-1}     # 0: keep the data folder (and its features) if made with the same settings
# --- where things go (checkpoints, logs, tokenizer and the report under OUT_DIR; the tower as in demo.sh)
OUT_DIR=${OUT_DIR:-out/temporal$([ "$ORACLE" != 1 ] || echo _oracle)}   # (an assignment takes its $(...)'s status: set -e)
DATA_DIR=${DATA_DIR:-dataset/synthetic_temporal}
# =====================================================================================
SETTINGS=(N_VIDEOS N_TEST SEED MIN_SECONDS MAX_SECONDS TEST_MAX_SECONDS VIDEO_FPS VIDEO_SIZE ORDER_QUESTIONS ORDER_ANSWERS OFFSET_SHARE VOCAB CLIP_MODEL
          CLIP_SIZE VISION_SEED SAMPLE_FPS FRAME_CAP SEGMENT_SECONDS K TIME_TEXT REGIONS ORACLE SUMMARY_DIM DIM LAYERS HEADS KV BS PRE_EPOCHS VID_EPOCHS
          PRE_LR SFT_LR TRAIN_SEED VAL_EVERY EXTRA_TRAIN_ARGS ABLATIONS OUT_DIR DATA_DIR)

cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib/steps.sh
source scripts/lib/steps.sh   # step, lane, join_lanes; times, peak RSS and settings under out/temporal/
# shellcheck source=scripts/lib/demo_parts.sh
source scripts/lib/demo_parts.sh   # the shared settings, VISION, flags, make_tower, train_step

OUT=$OUT_DIR
DATA=$DATA_DIR
TOKENIZER=$OUT/tokenizer

summary_flags() {   # summary_flags NAME: the VideoSummary flags of the model ("temporal") or an ablation
  case $1 in
    temporal) echo "--summary temporal --time_encoding seconds$([ "$TIME_TEXT" = 1 ] && echo " --timestamp_text")" ;;
    mean) echo "--summary mean" ;;
    no_time) echo "--summary temporal --time_encoding none" ;;
    *) return 1 ;;
  esac
}
read -r -a ablation_names <<< "$ABLATIONS"
for name in ${ablation_names[@]+"${ablation_names[@]}"}; do
  summary_flags "$name" > /dev/null || { echo "error: ABLATIONS: unknown ablation '$name' (known: mean no_time)" >&2; exit 2; }
done

steps_init "$OUT"
write_settings "${SETTINGS[@]}"

# 1. data (kept with FRESH_DATA=0 only if made by the very same command; else remade, features included)
MAKE_DATA=(python scripts/make_temporal.py --out "$DATA" --n_videos "$N_VIDEOS" --n_test "$N_TEST" --seed "$SEED"
  --min_seconds "$MIN_SECONDS" --max_seconds "$MAX_SECONDS" --test_max_seconds "$TEST_MAX_SECONDS"
  --fps "$VIDEO_FPS" --size "$VIDEO_SIZE" --order_questions "$ORDER_QUESTIONS" --order_answers "$ORDER_ANSWERS"
  --offset_share "$OFFSET_SHARE")
if [ "$FRESH_DATA" = 0 ] && [ -f "$DATA/meta.json" ] && [ "$(cat "$DATA/.made_by" 2>/dev/null)" = "${MAKE_DATA[*]}" ]; then
  echo "==> [data] keeping $DATA (made by the same command; FRESH_DATA=0)"
else
  if [ -e "$DATA" ] && [ ! -f "$DATA/meta.json" ] && [ -n "$(ls -A "$DATA" 2>/dev/null)" ]; then
    echo "error: DATA_DIR=$DATA: not empty and not a temporal suite (no meta.json); not removing it" >&2; exit 2
  fi
  rm -rf "$DATA"
  step data "${MAKE_DATA[@]}"
  echo "${MAKE_DATA[*]}" > "$DATA/.made_by"
fi
SPLITS=("$DATA/pretrain.jsonl" "$DATA/sft_video.jsonl" "$DATA/test.jsonl")

# 2. tokenizer, on the temporal suite's text only (its own folder: demo.sh's stays as it is)
step tokenizer python scripts/train_tokenizer.py --out "$TOKENIZER" --vocab_size "$VOCAB" --data "${SPLITS[@]:0:2}"

# 3. vision weights (kept if the file exists)
make_tower

# 4. CLIP features of the sampled frames (with their times), two parts side by side, then one manifest
# how frames are sampled and what the tower gives of each: the same flags for the features and the model
FRAME_FLAGS=(--frame_sampling fps --sample_fps "$SAMPLE_FPS" --num_frames "$FRAME_CAP" --clip_regions "$REGIONS")
features_in_two_parts python scripts/extract_features.py --data "${SPLITS[@]}" "${TOWER_FLAGS[@]}" \
  --clip_pretrained "$VISION" "${FRAME_FLAGS[@]}" --world_size 2 --num_workers 1

# 4b. ORACLE=1: the true state of each frame the cache holds, at its times and width, read instead of it
FEATURE_FLAGS=()
if [ "$ORACLE" = 1 ]; then
  rm -rf "$DATA/features/oracle"
  step oracle python scripts/oracle_features.py --data "$DATA" "${TOWER_FLAGS[@]}" --clip_pretrained "$VISION" \
    "${FRAME_FLAGS[@]}" --out "$DATA/features/oracle"
  FEATURE_FLAGS=(--feature_dir "$DATA/features/oracle")
fi

# 5-6. pretrain + video SFT + eval, for the model or an ablation
COMMON+=(--out_dir "$OUT" --tokenizer "$TOKENIZER" --max_len 1024 ${FEATURE_FLAGS[@]+"${FEATURE_FLAGS[@]}"})   # timeline answers make the longest ~830 tokens
ARCH=("${LM_FLAGS[@]}" "${FRAME_FLAGS[@]}" --num_visual_tokens "$K" --segment_seconds "$SEGMENT_SECONDS" --summary_dim "$SUMMARY_DIM" "${TOWER_FLAGS[@]}")

pipeline() {   # pipeline NAME: "temporal" (the model; checkpoints <stage>_<DIM>) or an ablation (<stage>_<DIM>_NAME)
  local name=$1 sfx="" summary
  [ "$name" = temporal ] || sfx="_$name"
  read -r -a summary <<< "$(summary_flags "$name")"
  train_step "pretrain$sfx" "$PRE_EPOCHS" "$PRE_LR" "pretrain_vlm_${DIM}${sfx}" \
    python train_pretrain.py --data_path "$DATA/pretrain.jsonl" "${ARCH[@]}" "${summary[@]}"
  train_step "sft_video$sfx" "$VID_EPOCHS" "$SFT_LR" "sft_video_${DIM}${sfx}" \
    python train_sft.py --stage video --data_path "$DATA/sft_video.jsonl" --from_weight "pretrain_vlm_${DIM}${sfx}"
  step "eval$sfx" python eval.py --out_dir "$OUT" --weight "sft_video_${DIM}${sfx}" --data_path "$DATA/test.jsonl" \
    --out "$OUT/preds_${name}.jsonl" --metrics_out "$OUT/metrics_${name}.json" --max_new_tokens 192 ${FEATURE_FLAGS[@]+"${FEATURE_FLAGS[@]}"}
}

rm -f "$OUT"/preds_*.jsonl "$OUT"/metrics_*.json   # never report a stale model or ablation
if [ ${#ablation_names[@]} -gt 0 ]; then
  share_cores $(( 1 + ${#ablation_names[@]} ))   # one lane each, all at once: no core idles at the end (README)
  lane train model pipeline temporal
  for name in "${ablation_names[@]}"; do lane train "$name" pipeline "$name"; done
  join_lanes train
else
  pipeline temporal
fi

# 7. the report card (its own time is in demo_times.json, not in the report it writes)
# shellcheck disable=SC2086
step report python scripts/report_temporal.py --out_dir "$OUT" --data "$DATA" \
  --weight "$OUT/sft_video_${DIM}.safetensors" --ablations $ABLATIONS

python - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
t, m = json.load(open(f"{out}/demo_times.json")), json.load(open(f"{out}/metrics.json"))
def figures(x):
    g = x.get("grounding") or {}
    return f"accuracy {x['accuracy']:.3f}, grounding mIoU {g.get('miou', 0):.3f}"
ablations = "".join(f"; {k.removeprefix('ablation_')}: {figures(v)}" for k, v in m.items()
                    if k.startswith("ablation_") and v)
print(f"temporal demo done in {t['total']:.0f} s: {figures(m)}{ablations}"
      + (f"; peak memory {t['peak_rss_gb']:.2f} GB" if "peak_rss_gb" in t else "") + f"; report: {out}/report.md")
PY
