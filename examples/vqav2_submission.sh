#!/usr/bin/env bash
# VQAv2: fine-tune a CC3M-pretrained checkpoint on train2014 questions, check accuracy on
# val2014, and write the EvalAI submission for test-dev.
# Needs: a GPU, the pretrained weights (internet or a local copy), the official VQAv2 files.
set -euo pipefail
VQA=${VQA:-vqa}            # v2_OpenEnded_mscoco_*_questions.json, v2_mscoco_*_annotations.json
COCO=${COCO:-coco}         # train2014/ val2014/ test2015/ image folders, annotations/ (captions_val2014.json, image_info_test2015.json)
INIT=${INIT:-runs/cc3m}

gitcap train --init-from "$INIT" --data "$COCO/train2014" \
    --questions "$VQA/v2_OpenEnded_mscoco_train2014_questions.json" \
    --annotations "$VQA/v2_mscoco_train2014_annotations.json" \
    --lora 16 --batch-size 32 --lr 1e-4 --epochs 3 --output-dir runs/vqa

# image TSVs keyed by COCO image id, so the questions' image_id finds its image
gitcap tsv images "$COCO/annotations/captions_val2014.json" --image-root "$COCO/val2014" --out data/vqa/val.img.tsv
gitcap tsv questions "$VQA/v2_OpenEnded_mscoco_val2014_questions.json" --images data/vqa/val.img.tsv \
    --out data/vqa/val.question.tsv
gitcap infer-tsv --images data/vqa/val.img.tsv --questions data/vqa/val.question.tsv \
    --checkpoint runs/vqa --out results/vqa-val.tsv
gitcap score-vqa --results results/vqa-val.tsv --annotations "$VQA/v2_mscoco_val2014_annotations.json" \
    --questions "$VQA/v2_OpenEnded_mscoco_val2014_questions.json"

gitcap tsv images "$COCO/annotations/image_info_test2015.json" --image-root "$COCO/test2015" --out data/vqa/test.img.tsv
gitcap tsv questions "$VQA/v2_OpenEnded_mscoco_test-dev2015_questions.json" --images data/vqa/test.img.tsv \
    --out data/vqa/test-dev.question.tsv
gitcap infer-tsv --images data/vqa/test.img.tsv --questions data/vqa/test-dev.question.tsv \
    --checkpoint runs/vqa --out results/vqa-test-dev.tsv
gitcap vqa-json --results results/vqa-test-dev.tsv \
    --questions "$VQA/v2_OpenEnded_mscoco_test-dev2015_questions.json" --out results/vqa_test-dev_submission.json
