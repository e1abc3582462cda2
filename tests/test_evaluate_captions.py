"""Caption scores equal pycocoevalcap's COCOEvalCap exactly (needs Java)."""

from __future__ import annotations

import contextlib
import io
import shutil

import pytest

from gitcli.errors import GitcapError
from gitcli.evaluate import captions, meteor, ptb
from support.synthetic_captions import synthetic_caption_set

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="needs Java")


def _cocoevalcap(results: dict[str, str], references: dict[str, list[str]], *, meteor: bool = True):
    """COCOEvalCap.evaluate() on the same data, SPICE (and METEOR unless asked for)
    swapped for a no-op."""
    from pycocoevalcap import eval as coco_eval
    from pycocotools.coco import COCO

    def skipped(name):
        class Skipped:
            def __init__(self, *args):
                pass

            def compute_score(self, gts, res):
                return 0.0, [0.0] * len(gts)

            def method(self):
                return name

        return Skipped

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
        originals = coco_eval.Spice, coco_eval.Meteor
        coco_eval.Spice = skipped("SPICE")
        if not meteor:
            coco_eval.Meteor = skipped("METEOR")
        try:
            evaluator.evaluate()
        finally:
            coco_eval.Spice, coco_eval.Meteor = originals
    return evaluator


def _assert_identical(ours: captions.CaptionScores, coco, metrics) -> None:
    for m in metrics:
        assert ours.scores[m] == coco.eval[m], m  # identical, not approximately equal
    assert [int(k) for k in ours.per_image] == list(coco.imgToEval)
    for k, per in ours.per_image.items():
        for m in metrics:
            assert per[m] == coco.imgToEval[int(k)][m], (k, m)


@needs_java
@pytest.mark.slow  # pycocoevalcap's METEOR loads its whole paraphrase table
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

    _assert_identical(ours, coco, captions.DEFAULT_METRICS)
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


NO_METEOR = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr")


@needs_java
@pytest.mark.parametrize("line_break", ["\r", "\u2028"])
def test_a_line_break_in_a_reference_and_an_empty_last_result_stay_paired(line_break):
    # The jar cuts the reference in two: every later reference of the group is paired with
    # its neighbour's tokens, in COCOEvalCap and so in gitcap, which says so.
    results, references = synthetic_caption_set(40, 3, seed=5)
    first, last = list(references)[0], list(references)[-1]
    references[first][1] = f"a dog{line_break}on the beach"
    results[last] = ""
    ours = captions.evaluate_captions(results, references, NO_METEOR, workers=2)
    _assert_identical(ours, _cocoevalcap(results, references, meteor=False), NO_METEOR)
    assert len(ours.warnings) == 1 and "1 line breaks inside the reference captions" in ours.warnings[0]


@needs_java
def test_a_line_break_the_jar_keeps_inside_a_token_shifts_nothing():
    # Inside what the jar's lexer reads as an e-mail address or a URL, U+2028 and \v stay
    # part of the token: no line break there, unlike the same character after a plain
    # word. (Found by the property test below: a model of where the jar breaks lines
    # paired these references one line off from COCOEvalCap.)
    results, references = synthetic_caption_set(12, 2, seed=3)
    keys = list(references)
    references[keys[2]][0] = "a dog\ron the beach"  # a real break: one line more
    references[keys[5]][1] = "mail aaF@1\u2028"  # kept in the token: no break
    references[keys[7]][0] = "see http://a\x0b"  # kept in the token: no break
    ours = captions.evaluate_captions(results, references, NO_METEOR, workers=2)
    _assert_identical(ours, _cocoevalcap(results, references, meteor=False), NO_METEOR)
    assert len(ours.warnings) == 1 and "1 line breaks inside the reference captions" in ours.warnings[0]


def test_a_tokenizer_output_that_leaves_an_image_without_tokens_is_refused(monkeypatch):
    monkeypatch.setattr(ptb, "_run_jar", lambda text: text.lower().split("\n")[:-1])  # loses the last line
    with pytest.raises(GitcapError, match="2 lines for 3 captions"):
        ptb.tokenize_groups([["A b"], ["C", "D"]], [["E"], ["F"], ["G"]])
    monkeypatch.setattr(ptb, "_run_jar", lambda text: ["x", *text.lower().split("\n")])  # one line more
    (refs, _) = ptb.tokenize_groups([["A b"], ["C"]], [["E"]])
    assert refs.captions == [["x"], ["a b"]] and refs.extra_lines == 1  # paired as COCOEvalCap pairs them


@needs_java
def test_references_without_a_word_are_one_line_not_a_traceback():
    # COCOEvalCap's CIDEr fails here with `max() arg is an empty sequence`.
    with pytest.raises(GitcapError, match="no reference caption has any"):
        captions.evaluate_captions({"1": "a dog", "2": "a cat"}, {"1": ["..."], "2": [""]}, ("CIDEr",))


def _fake_jar(path, *entries):
    import zipfile

    with zipfile.ZipFile(path, "w") as jar:
        for name in entries:
            jar.writestr(name, b"")
    return path


@pytest.fixture
def no_download(monkeypatch):
    """pycocoevalcap's plain-HTTP downloader must never run."""
    from pycocoevalcap.spice import get_stanford_models as g

    def forbidden(*args, **kwargs):
        raise AssertionError("pycocoevalcap tried to download CoreNLP")

    monkeypatch.setattr(g, "get_stanford_models", forbidden)
    monkeypatch.setattr(g, "urlretrieve", forbidden)


def test_spice_without_corenlp_says_where_to_put_a_verified_copy(monkeypatch, tmp_path, no_download):
    from gitcli.evaluate import spice

    monkeypatch.setattr(spice, "corenlp_jar", lambda: tmp_path / "lib" / "stanford-corenlp-3.6.0.jar")
    with pytest.raises(GitcapError) as err:
        spice.ensure_corenlp()
    message = str(err.value)
    assert "\n" not in message and "stanford-corenlp-3.6.0.jar is missing" in message
    assert "https://repo1.maven.org/" in message and "sha1sum" in message and str(tmp_path / "lib") in message


def test_spice_refuses_a_broken_or_foreign_jar_and_takes_a_whole_one(monkeypatch, tmp_path, no_download):
    from gitcli.evaluate import spice

    main, models = tmp_path / "stanford-corenlp-3.6.0.jar", tmp_path / "stanford-corenlp-3.6.0-models.jar"
    monkeypatch.setattr(spice, "corenlp_jar", lambda: main)
    _fake_jar(models, "edu/stanford/nlp/models/pos-tagger/english.tagger")
    main.write_bytes(b"<html>404 Not Found</html>")  # what a failed download leaves
    with pytest.raises(GitcapError, match="stanford-corenlp-3.6.0.jar is not a whole jar"):
        spice.ensure_corenlp()
    _fake_jar(main, "org/example/Other.class")
    with pytest.raises(GitcapError, match="is not CoreNLP 3.6.0's jar"):
        spice.ensure_corenlp()
    _fake_jar(main, "edu/stanford/nlp/pipeline/StanfordCoreNLP.class")
    truncated = models.read_bytes()[:-30]
    models.write_bytes(truncated)
    with pytest.raises(GitcapError, match="models.jar is not a whole jar"):
        spice.ensure_corenlp()
    _fake_jar(models, "edu/stanford/nlp/models/pos-tagger/english.tagger")
    spice.ensure_corenlp()  # both whole: SPICE may run


def test_spice_never_lets_pycocoevalcap_download(monkeypatch, tmp_path):
    from gitcli.evaluate import spice

    main = _fake_jar(tmp_path / "stanford-corenlp-3.6.0.jar", "edu/stanford/nlp/pipeline/StanfordCoreNLP.class")
    _fake_jar(tmp_path / "stanford-corenlp-3.6.0-models.jar", "edu/stanford/nlp/models/x.tagger")
    monkeypatch.setattr(spice, "corenlp_jar", lambda: main)
    monkeypatch.setattr(spice, "require_java", lambda what: "java")
    module = spice._spice_module()
    monkeypatch.setattr(module, "get_stanford_models", module.get_stanford_models)  # restored afterwards
    monkeypatch.setattr(module.Spice, "compute_score", lambda self, gts, res: (0.5, [0.5]))
    assert spice.spice_score({"1": ["a dog"]}, {"1": ["a dog"]}) == (0.5, [0.5])
    # what Spice() calls first thing is gitcap's check now, and it refuses, never fetches
    main.unlink()
    with pytest.raises(GitcapError, match="does not download unchecked"):
        module.Spice()


# ---- property: whatever the text, the pairing is COCOEvalCap's -------------------------
_WORDS = ["a", "dog", "cat", "runs", "on", "the", "beach", "Red", "U.S.", "etc.", "can't", "café", "Mr.", "|||"]
_HOSTILE = [
    "\r", "\n", "\r\n", "\x0b", "\x0c", "\u2028", "\u2029", "\x85", "\x00", "\x1c", "\t", "\u00a0", "\u3000",
    "\u0301", "e\u0301", "\u200b", "\u200d", "\ufeff", "\U0001f600", "\U0001f469\u200d\U0001f467", "'", '"', "``",
    ".", "...", "-", "--", "(", ")", "{", "<b>", "&amp;", "\\", " ", "  ",
    # where the jar's lexer reads an e-mail address or a URL, a line break can be part of a token
    "a@b", "@", "x@1", "http://", "www.", ".com", "$1", "3/4",
]


def _caption_strategy():
    from hypothesis import strategies as st

    piece = st.one_of(
        st.sampled_from(_WORDS),
        st.sampled_from(_HOSTILE),
        st.text(st.characters(blacklist_categories=("Cs",)), max_size=3),  # any code point
    )
    return st.one_of(st.just(""), st.lists(piece, max_size=7).map(" ".join), st.lists(piece, max_size=5).map("".join))


@needs_java
@pytest.mark.slow
def test_scores_equal_cocoevalcap_whatever_the_text():
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    caption = _caption_strategy()
    image = st.tuples(st.lists(caption, min_size=1, max_size=3), caption)  # (references, result)

    # Few examples, many images each: every example costs three tokenizer launches.
    @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(st.lists(image, min_size=8, max_size=30))
    def check(images):
        references = {str(i + 1): refs for i, (refs, _) in enumerate(images)}
        results = {str(i + 1): res for i, (_, res) in enumerate(images)}
        try:
            coco = _cocoevalcap(results, references, meteor=False)
        except Exception:  # COCOEvalCap itself fails (e.g. no reference word for CIDEr): one line from us
            with pytest.raises(GitcapError):
                captions.evaluate_captions(results, references, NO_METEOR, workers=2)
            return
        _assert_identical(captions.evaluate_captions(results, references, NO_METEOR, workers=2), coco, NO_METEOR)

    check()
