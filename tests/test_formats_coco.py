import json

import pytest

from support.scoring import write_json
from gitcli.errors import GitcapError
from gitcli.formats import coco


def test_coco_image_id_is_int_only_for_digit_keys():
    assert coco.coco_image_id("391895") == 391895
    assert coco.coco_image_id("img_7") == "img_7"
    assert coco.coco_image_id("٣") == "٣"  # a non-ASCII digit stays a string


def test_captions_follow_the_images_order(tmp_path):
    path = write_json(
        tmp_path / "c.json",
        {
            "images": [{"id": 3}, {"id": 1}, {"id": 2}],
            "annotations": [
                {"image_id": 1, "id": 10, "caption": "one a"},
                {"image_id": 3, "id": 11, "caption": "three"},
                {"image_id": 1, "id": 12, "caption": "one b"},
            ],
        },
    )
    assert coco.read_coco_captions(path) == {"3": ["three"], "1": ["one a", "one b"]}
    assert list(coco.read_coco_captions(path)) == ["3", "1"]  # image 2 has no caption


@pytest.mark.parametrize(
    "data, message",
    [
        ({"images": []}, 'no "annotations" list'),
        ({"annotations": [{"image_id": 1.0, "caption": "x"}]}, "image_id must be an integer or a string"),
        ({"annotations": [{"image_id": True, "caption": "x"}]}, "image_id must be an integer or a string"),
        ({"annotations": [{"image_id": 1, "caption": ["x"]}]}, "caption must be a string"),
        ([1, 2], 'no "annotations" list'),
    ],
)
def test_malformed_caption_annotations(tmp_path, data, message):
    with pytest.raises(GitcapError, match=message):
        coco.read_coco_captions(write_json(tmp_path / "c.json", data))


def test_results_round_trip_with_integer_ids(tmp_path):
    path = tmp_path / "r.json"
    coco.write_coco_results(path, {"42": "a cat", "img_1": "a dog"})
    assert json.loads(path.read_text()) == [
        {"image_id": 42, "caption": "a cat"},
        {"image_id": "img_1", "caption": "a dog"},
    ]
    assert coco.read_coco_results(path) == {"42": "a cat", "img_1": "a dog"}


@pytest.mark.parametrize(
    "data, message",
    [
        ({"image_id": 1, "caption": "x"}, "not a COCO results file"),
        ([{"image_id": 1, "caption": "x"}, {"image_id": 1, "caption": "y"}], "two results"),
        ([{"image_id": 1.5, "caption": "x"}], "image_id must be"),
        ([{"image_id": 1, "caption": None}], "caption must be a string"),
        (["x"], "is not an object"),
    ],
)
def test_malformed_results(tmp_path, data, message):
    with pytest.raises(GitcapError, match=message):
        coco.read_coco_results(write_json(tmp_path / "r.json", data))


def test_bad_json_file_is_one_clear_error(tmp_path):
    path = tmp_path / "r.json"
    path.write_text("[{", encoding="utf-8")
    with pytest.raises(GitcapError, match="not valid JSON"):
        coco.read_coco_results(path)
    with pytest.raises(GitcapError, match="not found"):
        coco.read_coco_results(tmp_path / "missing.json")


def test_karpathy_split(tmp_path):
    path = write_json(
        tmp_path / "k.json",
        {"images": [{"cocoid": 5, "split": "test"}, {"cocoid": 6, "split": "train"}, {"cocoid": 4, "split": "test"}]},
    )
    assert coco.read_karpathy_split(path) == ["5", "4"]
    assert coco.read_karpathy_split(path, "train") == ["6"]
    with pytest.raises(GitcapError, match="no image in split 'val'"):
        coco.read_karpathy_split(path, "val")
    bad = write_json(tmp_path / "b.json", {"images": [{"cocoid": "5", "split": "test"}]})
    with pytest.raises(GitcapError, match="cocoid must be an integer"):
        coco.read_karpathy_split(bad)


def test_vqa_questions_and_annotations(tmp_path):
    q = write_json(tmp_path / "q.json", {"questions": [{"question_id": 7, "image_id": 3, "question": "What?"}]})
    assert coco.read_vqa_questions(q) == [{"question_id": 7, "image_id": "3", "question": "What?"}]
    for bad, message in [
        ({"questions": [{"question_id": "7", "image_id": 3, "question": "What?"}]}, "question_id must be an integer"),
        ({"questions": [{"question_id": 7, "image_id": 3, "question": 1}]}, "question must be a string"),
        ({"questions": [{"question_id": 7, "image_id": 3, "question": "a"}] * 2}, "appears twice"),
        ({"annotations": []}, 'no "questions" list'),
    ]:
        with pytest.raises(GitcapError, match=message):
            coco.read_vqa_questions(write_json(tmp_path / "bad.json", bad))

    ann = {"question_id": 7, "question_type": "what", "answer_type": "other", "answers": [{"answer": "x", "answer_id": 1}]}
    a = write_json(tmp_path / "a.json", {"annotations": [ann]})
    assert coco.read_vqa_annotations(a)[7]["answers"][0]["answer"] == "x"
    for bad, message in [
        (dict(ann, question_id=7.0), "question_id must be an integer"),
        (dict(ann, answers=[]), "non-empty list"),
        (dict(ann, answers=[{"answer": 2}]), "every answer must be"),
        (dict(ann, answer_type=None), "answer_type must be a string"),
    ]:
        with pytest.raises(GitcapError, match=message):
            coco.read_vqa_annotations(write_json(tmp_path / "bad.json", {"annotations": [bad]}))


def test_vqa_submission_round_trip(tmp_path):
    path = tmp_path / "s.json"
    coco.write_vqa_submission(path, [{"question_id": 1, "answer": "yes"}])
    assert coco.read_vqa_submission(path) == [{"question_id": 1, "answer": "yes"}]
    with pytest.raises(GitcapError, match="question_id must be an integer"):
        coco.read_vqa_submission(write_json(tmp_path / "b.json", [{"question_id": None, "answer": "yes"}]))
