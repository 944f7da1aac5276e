#!/usr/bin/env bash
# Stage 3 — video SFT: (multi-turn) question answering on videos — colour, shape, direction,
# count, order, captions; the temporal VideoSummary learns what happens when.
# Usual --from_weight: sft_image_512 (the stage-2 checkpoint in out/).
#
#   bash scripts/sft_video.sh --data_path dataset/synthetic/sft_video.jsonl --from_weight sft_image_512
#   NPROC=2 bash scripts/sft_video.sh ...    # DDP via torchrun
source "$(dirname "$0")/launch.sh"
launch train_sft.py --stage video -- "$@"
