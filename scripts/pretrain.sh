#!/usr/bin/env bash
# Stage 1 — caption pretraining: aligns VideoSummary + projector with the language model on
# video/image captions (the LM trains too when it starts from scratch).
# Usual --from_weight: none (a fresh model at the real size).
#
#   bash scripts/pretrain.sh --data_path dataset/synthetic/pretrain.jsonl \
#        --clip_model ViT-B-16 --clip_pretrained openai [more flags]
#   NPROC=2 bash scripts/pretrain.sh ...     # DDP via torchrun
source "$(dirname "$0")/launch.sh"
launch train_pretrain.py -- "$@"
