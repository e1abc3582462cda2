"""Torch-free scoring: COCO caption metrics and the official VQA accuracy.

Level 2 of the layering: imports only `gitcli.formats`, `gitcli.config` and
`gitcli.errors` from gitcap, never torch. The entry points other layers call:

- `gitcli.evaluate.captions.score_captions(results, references, metrics=("CIDEr",))`
- `gitcli.evaluate.captions.evaluate_captions(results, references, metrics=...)`
- `gitcli.evaluate.vqa.vqa_accuracy(predictions, annotations)`
- `gitcli.evaluate.vqa.exact_match_accuracy(predictions, answers)`
- `gitcli.evaluate.normalize.normalize_answer(text)`
"""
