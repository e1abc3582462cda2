"""The static-cache decoder: same outputs as transformers' generate and as the dynamic cache,
buffers allocated once, the one-token step compiled once."""

import contextlib

import pytest
import torch
from test_generate_decode import PROMPTS, _hf, _inputs

from gitcli.config import GenerationConfig, from_dict, to_dict
from gitcli.errors import GitcapError
from gitcli.generate import generate
from gitcli.generate import static as static_mod
from gitcli.generate.decode import decode_tokens


@contextlib.contextmanager
def eos_bias(lm, eos, value):
    """Raise the EOS logit so that outputs end at different steps."""
    def hook(module, args, output):
        output[..., eos] += value
        return output

    handle = lm.get_output_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _tokens(captioner, px, cfg):
    return [g.token_ids for g in generate(captioner, px, PROMPTS, cfg)]


@torch.no_grad()
def test_static_greedy_matches_transformers_with_rows_ending_at_different_steps(tiny_captioner, scene_images):
    px, embeds, mask = _inputs(tiny_captioner, scene_images, PROMPTS)
    assert len({int(m.sum()) for m in mask}) > 1  # prompts of different lengths: left padding
    plain = _tokens(tiny_captioner, px, GenerationConfig(max_new_tokens=12, cache="static"))
    assert plain == _hf(tiny_captioner, embeds, mask, max_new_tokens=12, num_beams=1)
    eos = tiny_captioner.tokenizer.eos_token_id
    for value in (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0):
        with eos_bias(tiny_captioner.lm, eos, value):
            ours = _tokens(tiny_captioner, px, GenerationConfig(max_new_tokens=10, cache="static"))
            if len({len(r) for r in ours}) > 1 and min(len(r) for r in ours) < 10:
                assert ours == _hf(tiny_captioner, embeds, mask, max_new_tokens=10, num_beams=1)
                return
    pytest.fail("no EOS bias made the outputs end at different lengths")


@torch.no_grad()
@pytest.mark.parametrize("beams", [2, 3, 4])
def test_static_beam_search_returns_transformers_top_sequence(tiny_captioner, scene_images, beams):
    px, embeds, mask = _inputs(tiny_captioner, scene_images, PROMPTS)
    varied = False
    for bias in (0.0, 0.5, 0.75):  # 0: no early ends; then hypotheses end at different steps
        with eos_bias(tiny_captioner.lm, tiny_captioner.tokenizer.eos_token_id, bias):
            ours = _tokens(tiny_captioner, px, GenerationConfig(max_new_tokens=10, beams=beams, cache="static"))
            assert ours == _hf(tiny_captioner, embeds, mask, max_new_tokens=10, num_beams=beams), bias
            assert ours == _tokens(tiny_captioner, px, GenerationConfig(max_new_tokens=10, beams=beams)), bias
        varied |= len({len(r) for r in ours}) > 1
    assert varied, "no EOS bias made the top hypotheses end at different lengths"


@torch.no_grad()
def test_static_equals_dynamic_scores_and_fixed_length_workload(tiny_captioner, scene_images):
    _, embeds, mask = _inputs(tiny_captioner, scene_images, PROMPTS)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    for beams in (1, 3):
        rows = {cache: decode_tokens(tiny_captioner.lm, embeds, mask, positions,
                                     GenerationConfig(max_new_tokens=7, beams=beams, cache=cache), eos=None)
                for cache in ("dynamic", "static")}
        assert [t for t, _ in rows["static"]] == [t for t, _ in rows["dynamic"]]
        assert all(len(t) == 7 for t, _ in rows["static"])  # eos=None: nothing ends early
        for (_, a), (_, b) in zip(rows["static"], rows["dynamic"]):
            assert (a is None and b is None) or a == pytest.approx(b, abs=1e-5)


@torch.no_grad()
def test_static_sampling_is_seeded(tiny_captioner, scene_images):
    px, _, _ = _inputs(tiny_captioner, scene_images, PROMPTS)
    cfg = GenerationConfig(temperature=1.0, seed=5, cache="static", max_new_tokens=8)
    assert _tokens(tiny_captioner, px, cfg) == _tokens(tiny_captioner, px, cfg)


def _tiny_lm(family):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    if family == "gpt2":
        lm = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                        bos_token_id=1, eos_token_id=2, pad_token_id=0))
    else:  # grouped-query attention and rotary positions
        lm = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                          bos_token_id=1, eos_token_id=2, pad_token_id=0))
    return lm.eval()


@torch.no_grad()
@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("beams", [1, 3])
def test_static_matches_transformers_on_other_lm_families(family, beams):
    lm = _tiny_lm(family)
    g = torch.Generator().manual_seed(0)
    embeds = torch.randn(4, 6, 32, generator=g)
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[0, :3] = 0  # left padding of different lengths
    mask[2, :1] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    scale = float(lm(inputs_embeds=embeds).logits.std())  # random LMs differ in logit scale
    varied = False
    for bias in (0.0, 2.0, 2.5, 3.0, 4.0, 6.0):
        with eos_bias(lm, 2, bias * scale):
            ref = lm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=8, num_beams=beams,
                              do_sample=False, pad_token_id=0, eos_token_id=2)
            cfg = GenerationConfig(max_new_tokens=8, beams=beams, cache="static")
            ours = [t for t, _ in decode_tokens(lm, embeds, mask, positions, cfg, 2)]
        assert ours == [r[: r.index(2)] if 2 in r else r for r in ref.tolist()], bias
        varied |= len({len(t) for t in ours}) > 1
    assert varied, "no EOS bias made the rows end at different steps"


@torch.no_grad()
@pytest.mark.parametrize("beams", [1, 3])
def test_static_buffers_are_allocated_once(tiny_captioner, scene_images, monkeypatch, beams):
    """Every step writes into the same cache, mask and input tensors, and the next batch of
    the same shape reuses them."""
    px, _, _ = _inputs(tiny_captioner, scene_images, PROMPTS)
    seen = []
    real_step = static_mod.StaticState.step

    def spy(state, token):
        seen.append((id(state), tuple(t.data_ptr() for t in state.buffers())))
        return real_step(state, token)

    monkeypatch.setattr(static_mod.StaticState, "step", spy)
    cfg = GenerationConfig(max_new_tokens=6, beams=beams, cache="static")
    generate(tiny_captioner, px, PROMPTS, cfg)
    generate(tiny_captioner, px, PROMPTS, cfg)
    assert len(seen) == 2 * 5  # 6 tokens: one prefill, five one-token steps, per call
    assert len(set(seen)) == 1, "a step reallocated a buffer, or the second call built a new state"
    # one cache tensor per layer for keys and values, plus mask, ids, positions
    assert len(seen[0][1]) == 3 + 2 * tiny_captioner.lm.config.num_hidden_layers


@torch.no_grad()
def test_static_state_is_rebuilt_for_a_new_shape(tiny_captioner, scene_images):
    px, _, _ = _inputs(tiny_captioner, scene_images, PROMPTS)
    cfg = GenerationConfig(max_new_tokens=4, cache="static")
    generate(tiny_captioner, px, PROMPTS, cfg)
    first = static_mod._STATES[tiny_captioner.lm]
    generate(tiny_captioner, px[:2], PROMPTS[:2], cfg)
    second = static_mod._STATES[tiny_captioner.lm]
    assert second is not first and second.rows == 2
    assert second.length % static_mod.LENGTH_STEP == 0


@pytest.mark.slow
@torch.no_grad()
def test_compiled_step_matches_eager_and_compiles_once(tiny_captioner, scene_images, monkeypatch):
    """The compiled one-token step through dynamo, traced once for all steps and calls.

    The backend here runs the captured graph as it is ("eager"): inductor's C++ code
    generation takes minutes on a small CPU, and CUDA graphs need a GPU.
    """
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    monkeypatch.setattr(static_mod, "compile_options", lambda device: {"backend": counting_backend, "dynamic": False})
    torch._dynamo.reset()
    px, _, _ = _inputs(tiny_captioner, scene_images, PROMPTS)
    try:
        for beams in (1, 3):
            eager = _tokens(tiny_captioner, px, GenerationConfig(max_new_tokens=6, beams=beams, cache="static"))
            cfg = GenerationConfig(max_new_tokens=6, beams=beams, cache="static", compile=True)
            assert _tokens(tiny_captioner, px, cfg) == eager
            compiled_once = len(graphs)
            assert compiled_once >= 1
            assert _tokens(tiny_captioner, px, cfg) == eager
            assert len(graphs) == compiled_once, "the step was compiled again: a shape or guard changes per call"
    finally:
        torch._dynamo.reset()
        static_mod._STATES.pop(tiny_captioner.lm, None)


@pytest.mark.gpu
@torch.no_grad()
def test_cuda_graph_step_matches_dynamic_decoding(tiny_captioner, scene_images):
    """On a GPU --compile captures the one-token step as a CUDA graph ("reduce-overhead"):
    each replay must read the cache as it is now (written in place, beams reordered
    between replays), on the first call and on the next one that reuses the graph."""
    import copy

    model = copy.deepcopy(tiny_captioner).cuda()  # the session fixture stays on the CPU
    px, _, _ = _inputs(tiny_captioner, scene_images, PROMPTS)
    torch._dynamo.reset()
    try:
        for bias in (0.0, 0.75):
            with eos_bias(model.lm, model.tokenizer.eos_token_id, bias):
                for beams in (1, 3):
                    dynamic = _tokens(model, px, GenerationConfig(max_new_tokens=10, beams=beams))
                    cfg = GenerationConfig(max_new_tokens=10, beams=beams, cache="static", compile=True)
                    assert _tokens(model, px, cfg) == dynamic, (bias, beams)
                    assert _tokens(model, px, cfg) == dynamic, (bias, beams)
    finally:
        torch._dynamo.reset()


def test_generation_config_cache_and_compile_validation():
    with pytest.raises(GitcapError, match="--cache must be one of dynamic, static"):
        GenerationConfig(cache="paged").validate()
    with pytest.raises(GitcapError, match="--compile needs --cache static"):
        GenerationConfig(compile=True).validate()
    with pytest.raises(GitcapError, match="compile must be true or false"):
        GenerationConfig(cache="static", compile="yes").validate()
    cfg = GenerationConfig(beams=3, cache="static", compile=True)
    cfg.validate()
    back = from_dict(GenerationConfig, to_dict(cfg))
    assert back == cfg and back.cache == "static" and back.compile is True
    assert GenerationConfig().cache == "dynamic" and GenerationConfig().compile is False
