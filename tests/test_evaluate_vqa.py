"""Hand-computed VQA accuracies (official GT-Vision-Lab vqaEval.py rules)."""

import pytest

from gitcli.errors import GitcapError
from gitcli.evaluate.normalize import normalize_answer, process_digit_article, process_punctuation
from gitcli.evaluate.vqa import exact_match_accuracy, question_accuracy, vqa_accuracy


def humans(*answers: str) -> list[dict]:
    assert len(answers) == 10
    return [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)]


@pytest.mark.parametrize(
    "raw, normal",
    [
        ("Two", "2"),
        ("the dog.", "dog"),
        ("dont", "don't"),
        ("10,000", "10000"),
        ("A Black/White cat!", "black white cat"),
        ("2.5", "2.5"),  # a period before a digit stays
        ("None", "0"),
        ("  yes\n", "yes"),
        ("hot dog, yes", "hot dog yes"),  # punctuation next to a space is dropped, not spaced
    ],
)
def test_official_normalisation(raw, normal):
    assert normalize_answer(raw) == normal


def test_period_quirk_strips_at_most_32_periods():
    # The original passes re.UNICODE (32) as re.sub's count.
    assert process_punctuation("." * 40) == "." * 8
    assert process_digit_article("The Two Dogs") == "2 dogs"


# Two of ten humans agree with the prediction after normalisation, the rest say "x":
# leaving out one of the two agreeing answers leaves 1 match (1/3), leaving out any
# of the eight others leaves 2 matches (2/3): (2 * 1/3 + 8 * 2/3) / 10 = 0.6.
@pytest.mark.parametrize(
    "prediction, agreeing",
    [("Two", "2"), ("the dog.", "dog"), ("dont", "don't"), ("10,000", "10000"), ("10000", "10,000"), ("dog", "The dog")],
)
def test_normalised_match_when_humans_differ(prediction, agreeing):
    acc = question_accuracy(prediction, humans(agreeing, agreeing, *["x"] * 8))
    assert acc == pytest.approx(0.6)


def test_unanimous_humans_are_compared_without_normalisation():
    # The official code normalises only when the human answers differ: with ten "2"s,
    # "Two" scores 0 while "2" scores 1.
    assert question_accuracy("Two", humans(*["2"] * 10)) == 0.0
    assert question_accuracy("2", humans(*["2"] * 10)) == 1.0
    assert question_accuracy("the dog.", humans(*["dog"] * 10)) == 0.0
    assert question_accuracy(" dog\t", humans(*["dog"] * 10)) == 1.0  # whitespace is always cleaned


def test_three_of_ten_and_more():
    # 3 agreeing: leaving out an agreeing one leaves 2 (2/3), else 3 (1): (3*2/3 + 7)/10
    assert question_accuracy("yes", humans(*["yes"] * 3, *["no"] * 7)) == pytest.approx(0.9)
    assert question_accuracy("yes", humans(*["yes"] * 4, *["no"] * 6)) == 1.0
    # a single agreeing human: (1 * 0 + 9 * 1/3) / 10
    assert question_accuracy("yes", humans("yes", *["no"] * 9)) == pytest.approx(0.3)
    assert question_accuracy("maybe", humans("yes", *["no"] * 9)) == 0.0


def test_overall_per_type_and_rounding():
    anns = {
        1: {"answers": humans("yes", *["no"] * 9), "question_type": "is the", "answer_type": "yes/no"},  # 30
        2: {"answers": humans(*["2"] * 10), "question_type": "how many", "answer_type": "number"},  # 100
        3: {"answers": humans(*["2"] * 10), "question_type": "how many", "answer_type": "number"},  # 0
        4: {"answers": humans("red", "red", *["blue"] * 8), "question_type": "what color", "answer_type": "other"},  # 60
    }
    preds = {1: "yes", 2: "2", 3: "Two", 4: "Red"}
    acc = vqa_accuracy(preds, anns)
    assert acc.per_question == {1: 30.0, 2: 100.0, 3: 0.0, 4: 60.0}
    assert acc.overall == 47.5
    assert acc.per_answer_type == {"yes/no": 30.0, "number": 50.0, "other": 60.0}
    assert acc.per_question_type == {"is the": 30.0, "how many": 50.0, "what color": 60.0}
    assert acc.questions == 4
    # rounding to 2 decimals, as the official code: (0.3 + 1 + 0) / 3 = 43.333...
    assert vqa_accuracy({1: "yes", 2: "2", 3: "3"}, anns).overall == 43.33


def test_annotations_are_not_modified():
    answers = humans("Two", "Two", *["x"] * 8)
    vqa_accuracy({1: "2"}, {1: {"answers": answers, "question_type": "q", "answer_type": "a"}})
    assert answers[0]["answer"] == "Two"


def test_unknown_question_is_an_error():
    with pytest.raises(GitcapError, match="no annotation"):
        vqa_accuracy({9: "yes"}, {})


def test_exact_match_accuracy():
    assert exact_match_accuracy(["Two", "the dog.", "cat"], ["2", ["dog", "puppy"], "dog"]) == pytest.approx(2 / 3)
    with pytest.raises(GitcapError, match="2 predictions but 1 answers"):
        exact_match_accuracy(["a", "b"], ["a"])


def _official_vqa_eval(annotations: list[dict], results: list[dict]) -> dict:
    """vqaEval.py's evaluate() and setAccuracy() (GT-Vision-Lab/VQA), transcribed line by
    line: questions in the annotations' order (vqa.getQuesIds()), sums of unrounded
    accuracies per group, rounded at the end. Its normalisation is tested above."""
    res = {r["question_id"]: r for r in results}
    acc_qa, acc_ques_type, acc_ans_type = [], {}, {}
    for gts in annotations:
        quesId = gts["question_id"]
        resAns = res[quesId]["answer"].replace("\n", " ").replace("\t", " ").strip()
        gt_answers = [dict(a, answer=a["answer"].replace("\n", " ").replace("\t", " ").strip()) for a in gts["answers"]]
        if len({a["answer"] for a in gt_answers}) > 1:
            for a in gt_answers:
                a["answer"] = process_digit_article(process_punctuation(a["answer"]))
            resAns = process_digit_article(process_punctuation(resAns))
        gtAcc = []
        for gtAnsDatum in gt_answers:
            otherGTAns = [item for item in gt_answers if item != gtAnsDatum]
            matchingAns = [item for item in otherGTAns if item["answer"] == resAns]
            gtAcc.append(min(1, float(len(matchingAns)) / 3))
        avgGTAcc = float(sum(gtAcc)) / len(gtAcc)
        acc_qa.append(avgGTAcc)
        acc_ques_type.setdefault(gts["question_type"], []).append(avgGTAcc)
        acc_ans_type.setdefault(gts["answer_type"], []).append(avgGTAcc)
    return {
        "overall": round(100 * float(sum(acc_qa)) / len(acc_qa), 2),
        "perQuestionType": {t: round(100 * float(sum(v)) / len(v), 2) for t, v in acc_ques_type.items()},
        "perAnswerType": {t: round(100 * float(sum(v)) / len(v), 2) for t, v in acc_ans_type.items()},
    }


def test_sums_follow_the_annotations_order_whatever_the_results_order():
    # Question types of 16, 40 or 80 questions scoring 0, 30, 60, 90 or 100 %: their
    # means often land on a rounding tie (e.g. 30/16 = 1.875), where the order of the
    # float sum decides the printed value.
    import random

    rng = random.Random(7)
    annotations = []
    for t in range(60):
        for _ in range(rng.choice([16, 40, 80])):
            agree = rng.choice([0, 1, 2, 3, 10])
            annotations.append({
                "question_id": len(annotations) + 1, "answers": humans(*["yes"] * agree, *["no"] * (10 - agree)),
                "question_type": f"type {t}", "answer_type": rng.choice(["yes/no", "other", "number"]),
            })
    results = [{"question_id": a["question_id"], "answer": "yes"} for a in annotations]
    rng.shuffle(results)
    official = _official_vqa_eval(annotations, results)
    position = {r["question_id"]: i for i, r in enumerate(results)}
    in_results_order = _official_vqa_eval(sorted(annotations, key=lambda a: position[a["question_id"]]), results)
    assert in_results_order["perQuestionType"] != official["perQuestionType"]  # the order matters here

    ours = vqa_accuracy({r["question_id"]: r["answer"] for r in results}, {a["question_id"]: a for a in annotations})
    assert ours.overall == official["overall"]
    assert ours.per_answer_type == official["perAnswerType"]
    assert ours.per_question_type == official["perQuestionType"]
