#!/usr/bin/env bash
# Stage 3 — video SFT: (multi-turn) question answering on videos — colour, shape, direction,
# count, order, captions; the temporal VideoSummary learns what happens when.
# Usual --from_weight: sft_image_512 (the stage-2 checkpoint in out/).
#
#   bash scripts/sft_video.sh --data_path dataset/synthetic/sft_video.jsonl \
#        --from_weight sft_image_512 [more flags]
#   NPROC=2 bash scripts/sft_video.sh ...    # DDP via torchrun (gloo on CPU, nccl on CUDA)
#
# Runs from the repo root (relative paths are relative to it). Without --from_weight the model
# starts fresh at the real size (hidden 512, 8 layers, 8 heads, 2 KV heads); any flag given
# here wins. With --from_weight the checkpoint's config rules (only --clip_pretrained may change).
set -euo pipefail
cd "$(dirname "$0")/.."

DEFAULTS=(--hidden_size 512 --num_layers 8 --num_heads 8 --num_kv_heads 2)
for arg in "$@"; do
  case "$arg" in --from_weight|--from_weight=*) DEFAULTS=() ;; esac
done

if [ "${NPROC:-1}" -gt 1 ]; then
  LAUNCH=(python -m torch.distributed.run --standalone --nproc_per_node "$NPROC")
else
  LAUNCH=(python)
fi
exec "${LAUNCH[@]}" train_sft.py --stage video ${DEFAULTS[@]+"${DEFAULTS[@]}"} "$@"
