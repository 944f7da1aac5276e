#!/usr/bin/env bash
# Stage 1 — caption pretraining: aligns VideoSummary + projector with the language model on
# video/image captions (the LM trains too when it starts from scratch).
# Usual --from_weight: none (fresh model), or a converted MiniMind2 base LM checkpoint, in which
# case only summary,projector train by default (see --train_parts).
#
#   bash scripts/pretrain.sh --data_path dataset/synthetic/pretrain.jsonl \
#        --clip_model ViT-B-16 --clip_pretrained openai [more flags]
#   NPROC=2 bash scripts/pretrain.sh ...     # DDP via torchrun (gloo on CPU, nccl on CUDA)
#
# Runs from the repo root (relative paths are relative to it). Defaults below are the real size
# (MiniMind2-small: hidden 512, 8 layers, 8 heads, 2 KV heads); any flag given here wins.
# Pass --clip_pretrained (an open_clip tag, or a file in model/vision_model/): without it the
# frozen encoder is open_clip's unseeded random init.
set -euo pipefail
cd "$(dirname "$0")/.."

DEFAULTS=(--hidden_size 512 --num_layers 8 --num_heads 8 --num_kv_heads 2)
for arg in "$@"; do   # with --from_weight the checkpoint's config rules: add no architecture flags
  case "$arg" in --from_weight|--from_weight=*) DEFAULTS=() ;; esac
done

if [ "${NPROC:-1}" -gt 1 ]; then
  LAUNCH=(python -m torch.distributed.run --standalone --nproc_per_node "$NPROC")
else
  LAUNCH=(python)
fi
exec "${LAUNCH[@]}" train_pretrain.py ${DEFAULTS[@]+"${DEFAULTS[@]}"} "$@"
