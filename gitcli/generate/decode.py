"""Batched decoding with a KV cache.

The prefix and prompt are run once (prefill); each later step feeds one token per row.
Beam search prefills once per image and then copies the cache to the image's beams.
Greedy decoding is token-for-token what `transformers` `generate` gives on the same
inputs; beam search follows its scoring (length penalty over generated tokens, the top
`num_beams` of `2 * num_beams` candidates finish, early stop when no running beam can
beat the worst kept hypothesis).

Two ways to hold the cache (`GenerationConfig.cache`), same outputs:
- "dynamic" (default): transformers' `DynamicCache`, grown by one position per step;
  finished greedy rows and finished beam images leave the batch, so they cost nothing
  more. Nothing to compile, no memory held after the call.
- "static": one preallocated cache, mask and step inputs (`gitcli.generate.static`),
  written in place; shapes never change, so the one-token step can be compiled into a
  CUDA graph (`GenerationConfig.compile`). Finished rows are not dropped but keep
  running to the end (their output is cut at EOS): dropping them would change the shape,
  and a new shape is a new cache and a new graph. Captions end within a few tokens of
  each other and a decode step is bound by reading the weights, not by its row count, so
  the rows kept cost little next to what fixed shapes save; the batch still stops as
  soon as every row has ended. (Sampling therefore draws for every row at every step:
  once rows end early, its seeded draws differ from the dynamic path's.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gitcli.config import GenerationConfig
from gitcli.generate.compat import cache_argument
from gitcli.generate.inputs import prepare_inputs, prompts_for

NEG = -1.0e9


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    score: float | None = None  # beam search: length-normalised log-probability


def new_cache(lm):
    from transformers import DynamicCache

    return DynamicCache(config=lm.config)


def _static_state(lm, prefill, rows: int, length: int, device, config: GenerationConfig):
    """The LM's preallocated state for `rows` sequences of `length` positions, in the dtype
    the prefill's keys came out in (autocast decides it, not the weights)."""
    from gitcli.generate.static import static_state

    dtype = prefill.layers[0].keys.dtype
    return static_state(lm, rows, length, dtype, device, config.compile)


def lm_step(lm, cache, mask, positions, *, embeds=None, ids=None):
    out = lm(inputs_embeds=embeds, input_ids=ids, attention_mask=mask, position_ids=positions,
             use_cache=True, logits_to_keep=1, **{cache_argument(lm): cache})
    return out.logits[:, -1].float()  # (rows, V)


@torch.no_grad()
def generate(captioner, pixel_values: torch.Tensor, prompts: list[str] | None, config: GenerationConfig,
             prefix: torch.Tensor | None = None) -> list[Generation]:
    """Generate one output per image. `prompts[i]` is the text after image i's prefix
    (None: every image gets the caption prompt). Runs in the caller's autocast; most
    callers want `generate_for_images`, which builds the prompts from questions."""
    config.validate()
    lm, tokenizer = captioner.lm, captioner.tokenizer
    if prefix is None:
        prefix = captioner.image_prefix(pixel_values)
    if prompts is None:
        prompts = prompts_for(captioner.config, [None] * prefix.shape[0])
    embeds, mask, positions = prepare_inputs(captioner, prefix, prompts)
    seqs = decode_tokens(lm, embeds, mask, positions, config, tokenizer.eos_token_id)
    return [Generation(tokenizer.decode(t, skip_special_tokens=True).strip(), t, s) for t, s in seqs]


def decode_tokens(lm, embeds, mask, positions, config: GenerationConfig, eos: int | None):
    """Decode from prepared inputs (left-padded). -> (token ids, beam score or None) per row.

    `eos=None` never stops early: every row gets exactly `max_new_tokens` tokens, the fixed
    workload `gitcap bench generate` times (random weights emit EOS at random).
    """
    eos = -1 if eos is None else eos  # -1 is no token id, so nothing ever ends
    if config.beams > 1:
        return _beam_search(lm, embeds, mask, positions, config, eos)
    if config.cache == "static":
        return _greedy_or_sample_static(lm, embeds, mask, positions, config, eos)
    return _greedy_or_sample(lm, embeds, mask, positions, config, eos)


def _greedy_or_sample(lm, embeds, mask, positions, config: GenerationConfig, eos: int):
    """One token per running row per step; a row that emits EOS leaves the batch, so the
    cache, mask and positions shrink with it and finished rows cost nothing more."""
    rows, device = embeds.shape[0], embeds.device
    cache = new_cache(lm)
    gen = torch.Generator(device=device).manual_seed(config.seed) if config.sampling else None
    logits = lm_step(lm, cache, mask, positions, embeds=embeds)
    next_pos = positions[:, -1:] + 1
    outputs: list[list[int]] = [[] for _ in range(rows)]
    running = torch.arange(rows, device=device)  # original row of each batch row
    for step in range(config.max_new_tokens):
        token = pick_tokens(logits, config, gen)
        for row, tok in zip(running.tolist(), token.tolist()):
            outputs[row].append(tok)
        alive = token != eos
        if not bool(alive.any()) or step + 1 == config.max_new_tokens:
            break
        if not bool(alive.all()):  # drop finished rows from every per-row tensor
            keep = alive.nonzero()[:, 0]
            cache.batch_select_indices(keep)
            running, token, mask, next_pos = running[keep], token[keep], mask[keep], next_pos[keep]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        logits = lm_step(lm, cache, mask, next_pos, ids=token[:, None])
        next_pos = next_pos + 1
    return [(_until_eos(row, eos), None) for row in outputs]


def _greedy_or_sample_static(lm, embeds, mask, positions, config: GenerationConfig, eos: int):
    """Greedy / sampling on the preallocated cache: every row runs until all have ended.

    Tokens are collected on the device and read back once at the end; the only per-step
    host sync is the all-ended check, skipped when nothing can end early (`eos=None`).
    """
    rows, device, max_new = embeds.shape[0], embeds.device, config.max_new_tokens
    gen = torch.Generator(device=device).manual_seed(config.seed) if config.sampling else None
    prefill = new_cache(lm)
    logits = lm_step(lm, prefill, mask, positions, embeds=embeds)
    state = _static_state(lm, prefill, rows, mask.shape[1] + max_new - 1, device, config)
    state.start(prefill, mask, positions)
    del prefill  # its keys/values now live in the static cache
    tokens = torch.zeros((rows, max_new), dtype=torch.long, device=device)
    ended = torch.zeros(rows, dtype=torch.bool, device=device)
    for step in range(max_new):
        token = pick_tokens(logits, config, gen)
        tokens[:, step] = token
        if step + 1 == max_new:
            break
        if eos >= 0:
            ended |= token == eos
            if bool(ended.all()):
                break
        logits = state.step(token)
    return [(_until_eos(row, eos), None) for row in tokens[:, : step + 1].tolist()]


def pick_tokens(logits: torch.Tensor, config: GenerationConfig, gen) -> torch.Tensor:
    if not config.sampling:
        return logits.argmax(dim=-1)
    probs = F.softmax(logits / config.temperature, dim=-1)
    if config.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # keep the smallest set whose mass reaches top_p (the first token always stays)
        drop = sorted_p.cumsum(-1) - sorted_p > config.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=gen)[:, 0]


def _until_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


def _beam_search(lm, embeds, mask, positions, config: GenerationConfig, eos: int):
    batch, device = embeds.shape[0], embeds.device
    nb, max_new, lp = config.beams, config.max_new_tokens, config.length_penalty
    k = 2 * nb  # candidates kept per step, so nb stay alive even if nb of them end

    static = config.cache == "static"

    cache = new_cache(lm)
    logits = lm_step(lm, cache, mask, positions, embeds=embeds)  # prefill once per image
    logits = logits.repeat_interleave(nb, dim=0)
    if static:  # the prefix's keys/values are copied to each beam's rows of the static cache
        state = _static_state(lm, cache, batch * nb, mask.shape[1] + max_new - 1, device, config)
        state.start(cache, mask, positions, repeat=nb)
        cache = None
    else:
        cache.batch_repeat_interleave(nb)  # share the prefix's keys/values with each beam
        mask = mask.repeat_interleave(nb, dim=0)
        next_pos = positions[:, -1:].repeat_interleave(nb, dim=0) + 1

    run_seqs = torch.zeros((batch, nb, max_new), dtype=torch.long, device=device)
    run_scores = torch.full((batch, nb), NEG, device=device)
    run_scores[:, 0] = 0.0  # identical beams at the start: expand only the first
    fin_seqs = torch.zeros_like(run_seqs)
    fin_scores = torch.full((batch, nb), NEG, device=device)
    fin_lens = torch.zeros((batch, nb), dtype=torch.long, device=device)
    fin_filled = torch.zeros((batch, nb), dtype=torch.bool, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    in_top = (torch.arange(k, device=device) < nb)[None, :]
    offsets = (torch.arange(batch, device=device) * nb)[:, None]
    image = torch.arange(batch, device=device)  # original image of each batch entry
    results: list = [None] * batch

    for step in range(max_new):
        vocab = logits.shape[-1]
        logp = F.log_softmax(logits, dim=-1).view(batch, nb, vocab) + run_scores[:, :, None]
        top_scores, top_idx = logp.view(batch, nb * vocab).topk(k, dim=-1)  # (B, K)
        src_beam, token = top_idx // vocab, top_idx % vocab
        cand = torch.gather(run_seqs, 1, src_beam[:, :, None].expand(-1, -1, max_new)).clone()
        cand[:, :, step] = token
        ends = (token == eos) | (step + 1 == max_new)

        # hypotheses that end here compete for the nb finished slots
        normed = top_scores / float(step + 1) ** lp
        eligible = ends & in_top & ~done[:, None]
        normed = torch.where(eligible, normed, torch.full_like(normed, NEG))
        all_scores = torch.cat([fin_scores, normed], dim=1)
        keep = all_scores.topk(nb, dim=-1).indices
        # an image whose search ended keeps its hypotheses as they are (the static cache
        # keeps such images in the batch; the dynamic one has dropped them already)
        frozen = done[:, None]
        fin_seqs = torch.where(frozen[:, :, None], fin_seqs,
                               torch.gather(torch.cat([fin_seqs, cand], 1), 1, keep[:, :, None].expand(-1, -1, max_new)))
        new_lens = torch.full_like(token, step + 1)
        fin_lens = torch.where(frozen, fin_lens, torch.gather(torch.cat([fin_lens, new_lens], 1), 1, keep))
        fin_filled = torch.where(frozen, fin_filled, torch.gather(torch.cat([fin_filled, eligible], 1), 1, keep))
        fin_scores = torch.where(frozen, fin_scores, torch.gather(all_scores, 1, keep))

        # the best nb that did not end keep running
        alive_scores = top_scores + ends.float() * NEG
        sel = alive_scores.topk(nb, dim=-1).indices
        run_scores = torch.gather(alive_scores, 1, sel)
        run_seqs = torch.gather(cand, 1, sel[:, :, None].expand(-1, -1, max_new))
        parent = torch.gather(src_beam, 1, sel)
        next_token = torch.gather(token, 1, sel)

        # stop an image once no running beam can beat its worst kept hypothesis
        best_running = run_scores[:, 0] / float(step + 1) ** lp
        worst_kept = torch.where(fin_filled.all(dim=1), fin_scores.min(dim=1).values, torch.full_like(best_running, NEG))
        done |= fin_filled.all(dim=1) & (best_running <= worst_kept)
        if step + 1 == max_new:
            break
        if static:
            # without an EOS nothing ends before the last step: no host sync needed
            if eos >= 0 and bool(done.all()):
                break
            state.reorder((parent + offsets).flatten())  # in place, generated positions only
            logits = state.step(next_token.flatten())
            continue
        if bool(done.all()):
            break

        rows = (parent + offsets)  # (B, nb): the cache row each surviving beam continues
        if bool(done.any()):  # a finished image leaves the batch: its result is final
            ended = done.nonzero()[:, 0]
            _keep_best(results, image[ended], fin_seqs[ended], fin_lens[ended], fin_scores[ended], eos)
            keep = (~done).nonzero()[:, 0]
            rows, image = rows[keep], image[keep]
            run_seqs, run_scores, next_token = run_seqs[keep], run_scores[keep], next_token[keep]
            fin_seqs, fin_scores, fin_lens, fin_filled = fin_seqs[keep], fin_scores[keep], fin_lens[keep], fin_filled[keep]
            done = done[keep]
            batch = keep.shape[0]
            offsets = offsets[:batch]
        row_index = rows.flatten()
        cache.reorder_cache(row_index)  # reorders beams and drops finished images at once
        mask, next_pos = mask[row_index], next_pos[row_index]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        logits = lm_step(lm, cache, mask, next_pos, ids=next_token.flatten()[:, None])
        next_pos = next_pos + 1

    _keep_best(results, image, fin_seqs, fin_lens, fin_scores, eos)
    return results


def _keep_best(results: list, images: torch.Tensor, seqs: torch.Tensor, lens: torch.Tensor, scores: torch.Tensor,
               eos: int) -> None:
    """Store each image's top kept hypothesis in `results[image]` as (tokens without EOS,
    normalised score); the (n, nb, T) hypotheses are read back in one transfer."""
    rows = zip(images.tolist(), seqs[:, 0].tolist(), lens[:, 0].tolist(), scores[:, 0].tolist())
    for image, tokens, length, score in rows:
        results[image] = (_until_eos(tokens[:length], eos), score)
