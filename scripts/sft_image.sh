#!/usr/bin/env bash
# Stage 2 — image SFT: (multi-turn) question answering on images; an image is a 1-frame video,
# so the same VideoSummary + projector + LM all train.
# Usual --from_weight: pretrain_vlm_512 (the stage-1 checkpoint in out/).
#
#   bash scripts/sft_image.sh --data_path dataset/synthetic/sft_image.jsonl --from_weight pretrain_vlm_512
#   NPROC=2 bash scripts/sft_image.sh ...    # DDP via torchrun
source "$(dirname "$0")/launch.sh"
launch train_sft.py --stage image -- "$@"
