#!/usr/bin/env bash
# The whole offline pipeline on a CPU (2 cores, no internet), from a clean checkout:
#   synthetic data → tokenizer → seeded RANDOM open_clip tower → cached CLIP features →
#   pretrain → image SFT → video SFT → eval, and beside it the same three stages with the `mean`
#   VideoSummary (ablation) → eval → out/report.md, out/metrics.json (+ two PNGs).
# Independent work runs in two lanes side by side, each on half the cores (feature extraction in
# two parts; the model and the ablation): on 2 cores two 1-thread processes do ~1.45x the work of
# one 2-thread process, and at the demo's settings the results are bitwise the same (measured:
# 1 vs 2 threads give identical weights and features).
# Step times and peak memory go to out/demo_times.json, the settings to out/demo_settings.json.
#
#   bash scripts/demo.sh
#   N_VIDEOS=60 N_IMAGES=60 N_TEST=60 PRE_EPOCHS=1 IMG_EPOCHS=1 VID_EPOCHS=1 DIM=64 bash scripts/demo.sh   # smoke run
set -euo pipefail

# ============================ settings (env-overridable) =============================
# --- data
N_VIDEOS=${N_VIDEOS:-3000}      # training videos (binding two objects is data-hungry: README, stand-in encoder)
N_IMAGES=${N_IMAGES:-1500}      # training images (3 in 4 hold two objects)
N_TEST=${N_TEST:-200}           # test videos (30% of them novel_combo)
SEED=${SEED:-0}                 # dataset seed
# --- the visual path
FRAMES=${FRAMES:-8}             # frames sampled per video
K=${K:-8}                       # visual tokens per image/video
# --- training
BS=${BS:-32}
PRE_EPOCHS=${PRE_EPOCHS:-2}
IMG_EPOCHS=${IMG_EPOCHS:-2}
VID_EPOCHS=${VID_EPOCHS:-6}
# --- shared with scripts/demo_temporal.sh (scripts/lib/demo_parts.sh): CLIP_MODEL CLIP_SIZE VISION_SEED
#     SUMMARY_DIM VOCAB DIM LAYERS HEADS KV PRE_LR SFT_LR TRAIN_SEED VAL_EVERY EXTRA_TRAIN_ARGS
# --- switches
ABLATION=${ABLATION:-1}         # 0: skip the mean-summary ablation
FRESH_DATA=${FRESH_DATA:-1}     # 0: keep dataset/synthetic (and its feature cache) if meta.json has the same seed and counts
# =====================================================================================
SETTINGS=(N_VIDEOS N_IMAGES N_TEST SEED VOCAB CLIP_MODEL CLIP_SIZE VISION_SEED FRAMES K SUMMARY_DIM DIM LAYERS HEADS KV
          BS PRE_EPOCHS IMG_EPOCHS VID_EPOCHS PRE_LR SFT_LR TRAIN_SEED VAL_EVERY EXTRA_TRAIN_ARGS ABLATION)

cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib/steps.sh
source scripts/lib/steps.sh   # step, lane, join_lanes; times, peak RSS and settings under out/
# shellcheck source=scripts/lib/demo_parts.sh
source scripts/lib/demo_parts.sh   # the shared settings, VISION, flags, make_tower, train_step

DATA=dataset/synthetic
steps_init out
write_settings "${SETTINGS[@]}"

# 1. data (a dataset made with other settings is removed, feature cache included)
if [ "$FRESH_DATA" = 0 ] && python - "$DATA/meta.json" "$SEED" "$N_VIDEOS" "$N_IMAGES" "$N_TEST" <<'PY'
import json, sys
try:
    meta = json.load(open(sys.argv[1]))
    counts = meta["counts"]
    same = (meta["seed"], counts["train_videos"], counts["images"], counts["test_videos"]) == tuple(map(int, sys.argv[2:]))
    sys.exit(0 if same else 1)
except (OSError, ValueError, KeyError):
    sys.exit(1)
PY
then
  echo "==> [data] keeping $DATA (same seed and counts; FRESH_DATA=0)"
else
  rm -rf "$DATA"
  step data python scripts/make_synthetic.py --out "$DATA" --n_videos "$N_VIDEOS" --n_images "$N_IMAGES" --n_test "$N_TEST" --seed "$SEED"
fi

# 2. tokenizer
step tokenizer python scripts/train_tokenizer.py --out model/tokenizer --vocab_size "$VOCAB" \
  --data "$DATA/pretrain.jsonl" "$DATA/sft_image.jsonl" "$DATA/sft_video.jsonl"

# 3. vision weights (kept if the file exists)
make_tower

# 4. CLIP features of every frame of every media item, cached once for all stages and eval
#    (two parts side by side, each writing its own shards; then one manifest)
FEATURES=(python scripts/extract_features.py
  --data "$DATA/pretrain.jsonl" "$DATA/sft_image.jsonl" "$DATA/sft_video.jsonl" "$DATA/test.jsonl"
  --clip_model "$CLIP_MODEL" --clip_image_size "$CLIP_SIZE" --clip_pretrained "$VISION" --num_frames "$FRAMES"
  --world_size 2 --num_workers 1)
features_in_two_parts "${FEATURES[@]}"

# 5-7. three stages + eval, for a VideoSummary variant: temporal (the model) or mean (ablation)
ARCH=("${LM_FLAGS[@]}" --num_frames "$FRAMES" --num_visual_tokens "$K" --summary_dim "$SUMMARY_DIM" "${TOWER_FLAGS[@]}")

pipeline() {   # pipeline SUMMARY SUFFIX: SUFFIX ("" or "_mean") names the checkpoints and steps
  local summary=$1 sfx=$2
  train_step "pretrain$sfx" "$PRE_EPOCHS" "$PRE_LR" "pretrain_vlm_${DIM}${sfx}" \
    python train_pretrain.py --data_path "$DATA/pretrain.jsonl" "${ARCH[@]}" --summary "$summary"
  train_step "sft_image$sfx" "$IMG_EPOCHS" "$SFT_LR" "sft_image_${DIM}${sfx}" \
    python train_sft.py --stage image --data_path "$DATA/sft_image.jsonl" --from_weight "pretrain_vlm_${DIM}${sfx}"
  train_step "sft_video$sfx" "$VID_EPOCHS" "$SFT_LR" "sft_video_${DIM}${sfx}" \
    python train_sft.py --stage video --data_path "$DATA/sft_video.jsonl" --from_weight "sft_image_${DIM}${sfx}"
  step "eval$sfx" python eval.py --weight "sft_video_${DIM}${sfx}" --data_path "$DATA/test.jsonl" \
    --out "out/preds_${summary}.jsonl" --metrics_out "out/metrics_${summary}.json"
}

if [ "$ABLATION" = 1 ]; then
  lane train temporal pipeline temporal ""
  lane train mean pipeline mean _mean
  join_lanes train
else
  pipeline temporal ""
  rm -f out/preds_mean.jsonl out/metrics_mean.json   # never report a stale ablation
fi

# 8. the report card (its own time is in demo_times.json, not in the report it writes)
step report python scripts/report.py --out_dir out --data "$DATA" --weight "out/sft_video_${DIM}.safetensors"

python - <<'PY'
import json
t, m = json.load(open("out/demo_times.json")), json.load(open("out/metrics.json"))
mean = (m.get("ablation_mean") or {}).get("accuracy")
print(f"demo done in {t['total']:.0f} s: accuracy {m['accuracy']:.3f} (temporal questions "
      f"{m['temporal_accuracy']:.3f})" + (f", mean-summary ablation {mean:.3f}" if mean is not None else "")
      + (f"; peak memory {t['peak_rss_gb']:.2f} GB" if "peak_rss_gb" in t else "") + "; report: out/report.md")
PY
