"""Our decoder against transformers' generate on the same model and inputs."""

import pytest
import torch
from transformers import DynamicCache

from gitcli.config import GenerationConfig
from gitcli.data.text import encode_prompts
from gitcli.generate import generate


def _inputs(captioner, images, prompts):
    tf = captioner.image_transform()
    px = torch.stack([tf(im) for im in images])
    prefix = captioner.image_prefix(px)
    ids, mask = encode_prompts(captioner.tokenizer, prompts)
    embeds, mask, _ = captioner.join(prefix, ids, mask, left_pad=True)
    return px, embeds, mask


def _hf(captioner, embeds, mask, **kwargs):
    tok = captioner.tokenizer
    out = captioner.lm.generate(
        inputs_embeds=embeds, attention_mask=mask, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, do_sample=False, **kwargs,
    )
    rows = []
    for row in out.tolist():
        row = row[: row.index(tok.eos_token_id)] if tok.eos_token_id in row else row
        rows.append([t for t in row if t != tok.pad_token_id])
    return rows


PROMPTS = ["", "Question: what color is the circle? Answer:", "Question: how many shapes? Answer:",
           "", "Question: is there a red square? Answer:", "a"]


@torch.no_grad()
def test_greedy_matches_transformers_token_for_token(tiny_captioner, scene_images):
    px, embeds, mask = _inputs(tiny_captioner, scene_images, PROMPTS)
    cfg = GenerationConfig(max_new_tokens=12)
    ours = [g.token_ids for g in generate(tiny_captioner, px, PROMPTS, cfg)]
    theirs = _hf(tiny_captioner, embeds, mask, max_new_tokens=12, num_beams=1)
    assert ours == theirs
    assert any(len(set(r)) > 1 for r in ours)  # not a degenerate all-same output


@torch.no_grad()
@pytest.mark.parametrize("beams", [2, 4])
def test_beam_search_returns_transformers_top_sequence(tiny_captioner, scene_images, beams):
    px, embeds, mask = _inputs(tiny_captioner, scene_images, PROMPTS)
    cfg = GenerationConfig(max_new_tokens=10, beams=beams)
    ours = [g.token_ids for g in generate(tiny_captioner, px, PROMPTS, cfg)]
    theirs = _hf(tiny_captioner, embeds, mask, max_new_tokens=10, num_beams=beams)
    assert ours == theirs


@torch.no_grad()
def test_decoding_with_early_eos_matches_transformers(tiny_captioner, scene_images):
    """Raise the EOS logit so hypotheses end at different steps: exercises finished rows
    in greedy decoding and the pool of finished hypotheses in beam search."""
    eos = tiny_captioner.tokenizer.eos_token_id
    bias = {"value": 0.0}

    def add_eos_bias(module, args, output):
        output[..., eos] += bias["value"]
        return output

    handle = tiny_captioner.lm.get_output_embeddings().register_forward_hook(add_eos_bias)
    try:
        px, embeds, mask = _inputs(tiny_captioner, scene_images, PROMPTS)
        varied = False
        for value in (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0):
            bias["value"] = value
            greedy = [g.token_ids for g in generate(tiny_captioner, px, PROMPTS, GenerationConfig(max_new_tokens=10))]
            if len({len(r) for r in greedy}) > 1:
                varied = True
                break
        assert varied, "no EOS bias made the outputs end at different lengths"
        assert greedy == _hf(tiny_captioner, embeds, mask, max_new_tokens=10, num_beams=1)
        dropped = []
        for beams in (2, 3):
            rows_seen = []
            real_reorder = DynamicCache.reorder_cache

            def spy(cache, index, rows_seen=rows_seen):
                rows_seen.append(len(index))
                return real_reorder(cache, index)

            DynamicCache.reorder_cache = spy
            try:
                ours = [g.token_ids for g in generate(tiny_captioner, px, PROMPTS, GenerationConfig(max_new_tokens=10, beams=beams))]
            finally:
                DynamicCache.reorder_cache = real_reorder
            assert ours == _hf(tiny_captioner, embeds, mask, max_new_tokens=10, num_beams=beams)
            dropped.append(min(rows_seen) < len(PROMPTS) * beams)
        # images whose search ended left the batch: later steps ran on fewer cache rows
        assert any(dropped)
    finally:
        handle.remove()


@torch.no_grad()
def test_sampling_is_seeded_and_top_p_one_token_is_greedy(tiny_captioner, scene_images):
    px, _, _ = _inputs(tiny_captioner, scene_images[:3], PROMPTS[:3])
    a = generate(tiny_captioner, px, PROMPTS[:3], GenerationConfig(temperature=1.0, seed=7))
    b = generate(tiny_captioner, px, PROMPTS[:3], GenerationConfig(temperature=1.0, seed=7))
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    # a nucleus so small that only the most likely token survives is greedy decoding
    tiny = generate(tiny_captioner, px, PROMPTS[:3], GenerationConfig(temperature=1.0, top_p=1e-6, seed=3))
    greedy = generate(tiny_captioner, px, PROMPTS[:3], GenerationConfig())
    assert [g.token_ids for g in tiny] == [g.token_ids for g in greedy]


@pytest.mark.slow  # a fresh process that trains a step and decodes: ~10 s idle, more under load
def test_a_training_step_and_a_decode_print_no_library_warnings(tmp_path, scene_images):
    """What a user sees from `gitcap train` and `gitcap caption` on a CPU machine with the
    installed libraries: no transformers FutureWarning per decoded token, no DeepSpeed
    accelerator notice (DeepSpeed gets imported by transformers' save_pretrained). A fresh
    process, since both messages appear once per process."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    scene_images[0].save(tmp_path / "scene.png")
    run = tmp_path / "run"
    code = (
        "import sys; from gitcli.cli import app\n"
        "for args in (sys.argv[1:16], sys.argv[16:]):\n"
        "    try:\n"
        "        app(args, prog_name='gitcap')\n"
        "    except SystemExit as exc:\n"
        "        assert not exc.code, exc.code\n"
    )
    train = ["train", "--preset", "tiny", "--data", "synthetic", "--synthetic-size", "16", "--batch-size", "4",
             "--max-steps", "1", "--device", "cpu", "--output-dir", str(run)]
    caption = ["caption", str(tmp_path / "scene.png"), "-c", str(run), "--device", "cpu", "--max-new-tokens", "4"]
    assert len(train) == 15
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo), "PYTHONWARNINGS": "default"}
    result = subprocess.run([sys.executable, "-c", code, *train, *caption], cwd=repo, env=env,
                            capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert (run / "latest").is_file()  # the run saved, so save_pretrained ran
    assert "past_key_values" not in output and "FutureWarning" not in output
    assert "Setting accelerator" not in output and "[WARNING]" not in output


def test_decoding_uses_the_cache_argument_the_installed_transformers_takes(tiny_captioner, scene_images):
    """No FutureWarning from any decoding path with this transformers; an LM whose forward
    knows only the old name (transformers before the rename) still gets its cache."""
    import warnings

    from gitcli.generate.compat import cache_argument

    class OldLM(torch.nn.Module):
        def forward(self, input_ids=None, attention_mask=None, past_key_values=None, use_cache=None):
            return None

    assert cache_argument(OldLM()) == "past_key_values"
    px, _, _ = _inputs(tiny_captioner, scene_images[:3], PROMPTS[:3])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for cfg in (GenerationConfig(max_new_tokens=3), GenerationConfig(max_new_tokens=3, beams=2),
                    GenerationConfig(max_new_tokens=3, cache="static")):
            assert len(generate(tiny_captioner, px, PROMPTS[:3], cfg)) == 3
