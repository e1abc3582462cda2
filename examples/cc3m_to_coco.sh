#!/usr/bin/env bash
# Conceptual Captions 3M -> pre-train the mapping -> caption COCO (Karpathy test) -> score.
# Needs: a GPU, internet for the images and the pretrained weights, Java 17 for scoring.
# Inputs: Train_GCC-training.tsv (from the CC3M site); COCO val2014 images and
# captions_val2014.json + dataset_coco.json (Karpathy split).
set -euo pipefail
CC3M_TSV=${CC3M_TSV:-Train_GCC-training.tsv}
COCO_IMAGES=${COCO_IMAGES:-coco/val2014}
COCO_CAPTIONS=${COCO_CAPTIONS:-coco/annotations/captions_val2014.json}
KARPATHY=${KARPATHY:-coco/dataset_coco.json}
GPUS=${GPUS:-1}

gitcap fetch "$CC3M_TSV" --out data/cc3m/train --resize 256

torchrun --nproc_per_node "$GPUS" -m gitcli train --data data/cc3m/train \
    --vision ViT-L/14 --lm opt-2.7b --mapping transformer --prefix-length 10 \
    --batch-size 64 --lr 2e-4 --warmup-steps 2000 --epochs 1 --save-every 2000 \
    --output-dir runs/cc3m

gitcap tsv images "$COCO_CAPTIONS" --image-root "$COCO_IMAGES" --split "$KARPATHY" --out data/coco/test.img.tsv
gitcap tsv captions "$COCO_CAPTIONS" --split "$KARPATHY" --out data/coco/test.caption.tsv
gitcap infer-tsv --images data/coco/test.img.tsv --checkpoint runs/cc3m --beams 3 \
    --out results/coco-test.caption.tsv
gitcap score-coco --results results/coco-test.caption.tsv --labels data/coco/test.caption.tsv \
    --out results/coco-test.scores.json
