#!/usr/bin/env bash
# The original 8-bit LLaMA configuration: ViT-B/16 + LLaMA-7B loaded 8-bit with
# bitsandbytes, LoRA adapters on the LM, vision tower trained, on CC3M shards.
set -euo pipefail
gitcap train --data data/cc3m/train --vision ViT-B/16 --lm llama-7b --int8 --lora 16 \
    --train-vision --mapping linear-ln --grid --batch-size 10 --grad-accum 4 --lr 1e-4 \
    --output-dir runs/llama-int8 "$@"
