"""Every command, hostile arguments: missing, unwritable and directory-instead-of-file
paths, empty files, wrong file kinds, out-of-range numbers. Each must end in a readable
message and a non-zero exit — never a traceback — and must not create its output."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from gitcli.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_checkpoint):
    root = tmp_path_factory.mktemp("hostile")
    (root / "empty.tsv").write_text("")
    (root / "binary.bin").write_bytes(bytes(range(256)) * 4)
    (root / "text.txt").write_text("just some words\n")
    (root / "not.json").write_text("{not json")
    (root / "list.json").write_text(json.dumps([1, 2, 3]))
    (root / "a_dir").mkdir()
    (root / "empty_dir").mkdir()
    (root / "fake.png").write_text("not really a png")
    return {
        "missing": str(root / "missing" / "nothing.tsv"),
        "empty": str(root / "empty.tsv"),
        "binary": str(root / "binary.bin"),
        "text": str(root / "text.txt"),
        "notjson": str(root / "not.json"),
        "list": str(root / "list.json"),
        "dir": str(root / "a_dir"),
        "emptydir": str(root / "empty_dir"),
        "fakepng": str(root / "fake.png"),
        "under_file": str(root / "text.txt" / "out.tsv"),  # a parent that is a file: cannot be created
        "ckpt": str(tiny_checkpoint),
        "root": root,
    }


# (command line with {placeholders}, what the case is about)
CASES = [
    # fetch
    ("fetch {missing} --out {root}/f1", "missing input"),
    ("fetch {dir} --out {root}/f2", "directory as input"),
    ("fetch {empty} --out {root}/f3", "empty input"),
    ("fetch {binary} --out {root}/f4", "binary input"),
    ("fetch {text} --out {text}", "output is a file"),
    ("fetch {text} --out {root}/f5 --shard-size 0", "out of range"),
    ("fetch {text} --out {root}/f6 --part 3/2", "bad part"),
    # train
    ("train --data {missing} --output-dir {root}/t1", "missing data"),
    ("train --data {emptydir} --output-dir {root}/t2", "empty data folder"),
    ("train --data {binary} --output-dir {root}/t3", "binary data"),
    ("train --data synthetic --preset tiny --output-dir {text}", "output dir is a file"),
    ("train --data synthetic --preset tiny --output-dir {root}/t4 --batch-size 0", "out of range"),
    ("train --data synthetic --preset tiny --output-dir {root}/t5 --lr -1", "negative lr"),
    ("train --data synthetic --preset tiny --output-dir {root}/t6 --init-from {missing}", "missing init"),
    ("train --data synthetic --preset tiny --output-dir {root}/t7 --deepspeed-config {notjson} --zero 2", "bad json"),
    # caption / ask
    ("caption {missing} --checkpoint {ckpt}", "missing image"),
    ("caption {text} --checkpoint {ckpt}", "not an image"),
    ("caption {fakepng} --checkpoint {ckpt}", "fake png"),
    ("caption {emptydir} --checkpoint {ckpt}", "folder without images"),
    ("caption {fakepng} --checkpoint {missing}", "missing checkpoint"),
    ("caption {fakepng} --checkpoint {text}", "checkpoint is a file"),
    ("caption {fakepng} --checkpoint {emptydir}", "checkpoint folder is empty"),
    ("caption {fakepng} --checkpoint {ckpt} --beams 0", "out of range"),
    ("caption {fakepng} --checkpoint {ckpt} --top-p 2", "out of range"),
    ("ask {missing} 'what?' --checkpoint {ckpt}", "missing image"),
    ("ask {text} 'what?' --checkpoint {ckpt} --max-new-tokens 0", "out of range"),
    # infer-tsv
    ("infer-tsv --images {missing} --out {root}/i1.tsv --checkpoint {ckpt}", "missing images"),
    ("infer-tsv --images {dir} --out {root}/i2.tsv --checkpoint {ckpt}", "images is a folder"),
    ("infer-tsv --images {binary} --out {root}/i3.tsv --checkpoint {ckpt}", "binary images"),
    ("infer-tsv --images {text} --out {dir} --checkpoint {ckpt}", "out is a folder"),
    ("infer-tsv --images {text} --out {under_file} --checkpoint {ckpt}", "out cannot be created"),
    ("infer-tsv --images {text} --questions {missing} --out {root}/i4.tsv --checkpoint {ckpt}", "missing questions"),
    ("infer-tsv --images {text} --out {root}/i5.tsv --checkpoint {ckpt} --batch-size 0", "out of range"),
    # scoring
    ("score-coco --results {missing} --labels {text}", "missing results"),
    ("score-coco --results {empty} --labels {empty}", "empty files"),
    ("score-coco --results {binary} --labels {binary}", "binary files"),
    ("score-coco --results {notjson} --labels {list}", "wrong json"),
    ("score-coco --results {text} --labels {text} --out {dir}", "out is a folder"),
    ("score-coco --results {text} --labels {text} --out {under_file}", "out cannot be created"),
    ("vqa-json --results {missing} --out {root}/v1.json", "missing results"),
    ("vqa-json --results {binary} --out {root}/v2.json", "binary results"),
    ("vqa-json --results {text} --out {dir}", "out is a folder"),
    ("vqa-json --results {text} --questions {notjson} --out {root}/v3.json", "bad questions"),
    ("score-vqa --results {text} --annotations {missing} --questions {missing}", "missing files"),
    ("score-vqa --results {text} --annotations {list} --questions {list}", "wrong json"),
    ("score-vqa --results {text} --annotations {notjson} --questions {notjson} --out {dir}", "out is a folder"),
    # tsv
    ("tsv images {missing} --out {root}/s1.tsv", "missing source"),
    ("tsv images {emptydir} --out {root}/s2.tsv", "empty folder"),
    ("tsv images {list} --image-root {dir} --out {root}/s3.tsv", "wrong json"),
    ("tsv images {dir} --out {dir}", "out is a folder"),
    ("tsv images {dir} --out {under_file}", "out cannot be created"),
    ("tsv captions {notjson} --out {root}/s4.tsv", "bad json"),
    ("tsv captions {list} --out {root}/s5.tsv", "wrong json"),
    ("tsv questions {list} --images {missing} --out {root}/s6.tsv", "missing images"),
    ("tsv questions {binary} --images {text} --out {root}/s7.tsv", "binary questions"),
    # bench
    ("bench train --preset tiny --device cpu --batch-size 0", "out of range"),
    ("bench train --lm {missing} --device cpu", "missing LM"),
    ("bench generate --preset tiny --device cpu --steps 0", "out of range"),
    ("bench generate --preset tiny --device cpu --beams 0", "out of range"),
    ("bench train --preset tiny --device cuda:7", "no such device"),
    # serve (refused before the model loads and before the port is bound)
    ("serve --checkpoint {missing}", "missing checkpoint"),
    ("serve --checkpoint {text}", "checkpoint is a file"),
    ("serve --preset huge", "unknown preset"),
    ("serve --preset tiny --port 99999", "out of range"),
    ("serve --preset tiny --max-batch-size 0", "out of range"),
    ("serve --preset tiny --beams 0", "out of range"),
    # demo
    ("demo --output-dir {text}", "output dir is a file"),
    ("demo --output-dir {root}/d1 --steps 0", "out of range"),
]


def _argv(template: str, files: dict) -> list[str]:
    import shlex

    return shlex.split(template.format(**files))


@pytest.mark.parametrize("template,about", CASES, ids=[f"{c.split()[0]}:{a}" for c, a in CASES])
def test_hostile_arguments_get_a_message_never_a_traceback(template, about, files):
    before = sorted(p.name for p in files["root"].iterdir())
    result = runner.invoke(app, _argv(template, files))
    assert result.exit_code not in (0, None), f"{about}: exit 0\n{result.output}"
    # a crash inside the command shows up as the runner's exception, not as SystemExit
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        f"{about}: {type(result.exception).__name__}: {result.exception}"
    assert "Traceback" not in result.output
    message = [line for line in result.output.splitlines() if line.strip()]
    assert message and len(message) <= 12, f"{about}: {len(message)} lines\n{result.output}"
    # a line index beside a TSV that was read is GIT's convention, not an output
    after = sorted(p.name for p in files["root"].iterdir() if ".lineidx" not in p.name)
    assert after == [name for name in before if ".lineidx" not in name], f"{about}: created {set(after) - set(before)}"
