"""Caption scores equal pycocoevalcap's COCOEvalCap exactly (needs Java)."""

from __future__ import annotations

import contextlib
import io
import shutil

import pytest

from gitcli.errors import GitcapError
from gitcli.evaluate import captions, meteor, ptb
from gitcli.evaluate.synthetic_captions import synthetic_caption_set

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="needs Java")


def _cocoevalcap(results: dict[str, str], references: dict[str, list[str]]):
    """COCOEvalCap.evaluate() on the same data, SPICE swapped for a no-op."""
    from pycocoevalcap import eval as coco_eval
    from pycocotools.coco import COCO

    class NoSpice:
        def compute_score(self, gts, res):
            return 0.0, [0.0] * len(gts)

        def method(self):
            return "SPICE"

    coco = COCO()
    coco.dataset = {
        "images": [{"id": int(k)} for k in references],
        "annotations": [
            {"id": n, "image_id": int(k), "caption": c}
            for n, (k, c) in enumerate((k, c) for k, caps in references.items() for c in caps)
        ],
    }
    coco.createIndex()
    with contextlib.redirect_stdout(io.StringIO()):
        res = coco.loadRes([{"image_id": int(k), "caption": results[k]} for k in references])
        evaluator = coco_eval.COCOEvalCap(coco, res)
        original, coco_eval.Spice = coco_eval.Spice, NoSpice
        try:
            evaluator.evaluate()
        finally:
            coco_eval.Spice = original
    return evaluator


@needs_java
def test_identical_to_cocoevalcap_with_meteor_split_over_two_jars(monkeypatch):
    results, references = synthetic_caption_set(60, 5, seed=3)
    # awkward input the tokenizer must treat exactly alike: unicode, punctuation, '|||'
    first, second = list(references)[:2]
    references[first][0] = "Un café, près d'une fenêtre... (très) joli!"
    results[first] = "a café -- with ||| pipes"
    results[second] = "A DOG; running?!"
    monkeypatch.setattr(meteor, "segments_per_jar", lambda: 25)
    assert meteor.jars_for(60, free_cores=2) == 2  # so the statistics come from two jars
    ours = captions.evaluate_captions(results, references, captions.DEFAULT_METRICS, workers=4)
    coco = _cocoevalcap(results, references)

    for m in captions.DEFAULT_METRICS:
        assert ours.scores[m] == coco.eval[m], m  # identical, not approximately equal
    for k in references:
        for m in captions.DEFAULT_METRICS:
            assert ours.per_image[k][m] == coco.imgToEval[int(k)][m], (k, m)
    assert 0.2 < ours.scores["CIDEr"] < 5  # a real, non-degenerate score


def test_jar_count_follows_spare_cores_and_work():
    assert meteor.jars_for(5000, free_cores=0) == 1  # a 2-core machine: one jar
    assert meteor.jars_for(5000, free_cores=14) == 5
    assert meteor.jars_for(100, free_cores=14) == 1
    assert meteor.jars_for(1500, free_cores=14) == 2


def test_metric_names_resolve():
    assert captions.resolve_metrics(["cider", "BLEU"]) == ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "CIDEr")
    assert captions.resolve_metrics(["rouge-l", "bleu4", "METEOR"]) == ("Bleu_4", "METEOR", "ROUGE_L")
    with pytest.raises(GitcapError, match="unknown caption metric 'wer'"):
        captions.resolve_metrics(["wer"])


def test_inputs_must_match():
    with pytest.raises(GitcapError, match="1 labelled images have no result"):
        captions.evaluate_captions({"1": "a"}, {"1": ["a"], "2": ["b"]})
    with pytest.raises(GitcapError, match="1 results have no labels"):
        captions.evaluate_captions({"1": "a", "3": "c"}, {"1": ["a"]})
    with pytest.raises(GitcapError, match="non-empty list"):
        captions.evaluate_captions({"1": "a"}, {"1": []})


def test_missing_java_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(GitcapError, match="needs Java"):
        captions.score_captions({"1": "a dog"}, {"1": ["a dog runs"]}, metrics=("CIDEr",))


def test_tokenizer_falls_back_to_separate_launches_when_lines_do_not_align(monkeypatch):
    calls = []

    def fake_jar(lines):
        calls.append(list(lines))
        out = [line.lower() + " ." for line in lines]
        if len(calls) == 1:
            out.append("an extra line")  # the jar split a caption in two
        return out + [""]

    monkeypatch.setattr(ptb, "_run_jar", fake_jar)
    refs, res = ptb.tokenize_groups([["A b", "C"]], [["D"]])
    assert refs == [["a b", "c"]] and res == [["d"]]
    assert calls == [["A b", "C", "D"], ["A b", "C"], ["D"]]


def test_spice_without_corenlp_is_one_clear_error(monkeypatch, tmp_path):
    from pycocoevalcap.spice import get_stanford_models as g

    from gitcli.evaluate import spice

    monkeypatch.setattr(spice, "corenlp_jar", lambda: tmp_path / "stanford-corenlp-3.6.0.jar")

    def no_network():
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(g, "get_stanford_models", no_network)
    with pytest.raises(GitcapError, match="SPICE cannot run: Stanford CoreNLP 3.6.0 .* could not be downloaded"):
        spice.ensure_corenlp()
