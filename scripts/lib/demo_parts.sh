# What both offline demos (scripts/demo.sh, scripts/demo_temporal.sh) share besides step bookkeeping:
# the frozen random tower, the LM's shape and the training knobs (env-overridable, like each demo's
# own settings block), the flags built from them, and the steps they run alike. Source it after the
# demo's own settings (BS must be set) and after scripts/lib/steps.sh.

# --- frozen vision encoder (random, seeded: one weights file serves both demos)
CLIP_MODEL=${CLIP_MODEL:-ViT-Demo-16}  # model/vision_model/ViT-Demo-16.json: 3 layers, width 256, 16-px patches
CLIP_SIZE=${CLIP_SIZE:-128}
VISION_SEED=${VISION_SEED:-0}
SUMMARY_DIM=${SUMMARY_DIM:-128}
# --- language model
VOCAB=${VOCAB:-1024}            # BPE tokenizer size = LM vocab_size
DIM=${DIM:-128}
LAYERS=${LAYERS:-2}
HEADS=${HEADS:-4}
KV=${KV:-2}
# --- training
PRE_LR=${PRE_LR:-2e-3}
SFT_LR=${SFT_LR:-2e-3}
TRAIN_SEED=${TRAIN_SEED:-42}
VAL_EVERY=${VAL_EVERY:-50}
EXTRA_TRAIN_ARGS=${EXTRA_TRAIN_ARGS:-}  # appended to every training command, e.g. "--warmup_steps 50"

VISION=${TOWER_FILE:-"model/vision_model/${CLIP_MODEL}-${CLIP_SIZE}-random-seed${VISION_SEED}.safetensors"}   # the random tower file (made if missing)
LM_FLAGS=(--hidden_size "$DIM" --num_layers "$LAYERS" --num_heads "$HEADS" --num_kv_heads "$KV" --vocab_size "$VOCAB")
TOWER_FLAGS=(--clip_model "$CLIP_MODEL" --clip_image_size "$CLIP_SIZE")
COMMON=(--no_progress --val_every "$VAL_EVERY" --batch_size "$BS" --seed "$TRAIN_SEED" --clip_pretrained "$VISION")
# shellcheck disable=SC2206
EXTRA=($EXTRA_TRAIN_ARGS)

make_tower() {   # the random tower's weights file (kept if it exists)
  step vision python scripts/make_random_vision.py --clip_model "$CLIP_MODEL" --image_size "$CLIP_SIZE" \
    --seed "$VISION_SEED" --out "$VISION"
}

features_in_two_parts() {   # features_in_two_parts EXTRACT_COMMAND...: two parts side by side, each its own shards; then one manifest
  lane features part1 step features_1 "$@" --rank 0
  lane features part2 step features_2 "$@" --rank 1
  join_lanes features
  step features_merge "$@" --merge
}

train_step() {   # train_step NAME EPOCHS LR SAVE_NAME COMMAND...: a training stage with the shared flags after COMMAND
  local name=$1 epochs=$2 lr=$3 save=$4
  shift 4
  step "$name" "$@" --epochs "$epochs" --learning_rate "$lr" --save_name "$save" "${COMMON[@]}" \
    ${EXTRA[@]+"${EXTRA[@]}"}
}
