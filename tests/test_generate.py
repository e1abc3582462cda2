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
