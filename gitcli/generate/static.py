"""Fixed-shape decoding state: a preallocated KV cache, attention mask and step inputs.

The dynamic path grows its cache with `torch.cat` every step and reorders beams by
reallocating every layer's keys and values. Here everything a one-token step reads or
writes is allocated once for (rows, prompt + max_new_tokens) positions:

- step t writes its keys/values in place at position `prompt + t` (transformers'
  `StaticLayer` keeps the write position in a tensor, so a compiled step needs no Python
  int that changes per step);
- the attention mask is full length from the start, zeros ahead of the current position,
  and a step sets one column to 1 in place;
- a beam reorder copies, in place, only the generated positions: the beams of one image
  share its prefix and prompt, so those positions are equal across them and need no copy.

Fixed shapes and fixed addresses are what CUDA graphs need, so the one-token step can be
`torch.compile`d (mode "reduce-overhead" on CUDA). The state is kept per LM and reused by
the next batch of the same shape: a new cache would mean new addresses and a new graph.
"""

from __future__ import annotations

import weakref

import torch

from gitcli.generate.compat import cache_argument

# Cache lengths are rounded up to this, so batches whose prompts differ by a few tokens
# (questions) share one cache and one compiled graph; the extra positions stay masked.
LENGTH_STEP = 8

_STATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # lm -> StaticState


def _one_token(lm, cache, ids, mask, positions, cache_name: str = "past_key_values"):
    out = lm(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1,
             **{cache_name: cache})
    return out.logits[:, -1].float()  # (rows, V)


def compile_options(device: torch.device) -> dict:
    """torch.compile arguments for the one-token step. On CUDA "reduce-overhead" captures
    the step as a CUDA graph (one launch instead of hundreds of kernels); shapes never
    change within a decode, so dynamic shapes are off."""
    return {"mode": "reduce-overhead" if device.type == "cuda" else None, "dynamic": False, "fullgraph": False}


class StaticState:
    """The buffers of one decoding shape: `rows` sequences of at most `length` positions."""

    def __init__(self, lm, rows: int, length: int, dtype: torch.dtype, device: torch.device, compile: bool):
        from transformers import StaticCache

        self.rows, self.length, self.dtype, self.device, self.compiled = rows, length, dtype, device, compile
        self._lm = weakref.ref(lm)  # held per LM in a weak dictionary: a strong reference would keep the LM alive
        self.cache = StaticCache(config=lm.config, max_cache_len=length)
        self.mask = torch.zeros((rows, length), dtype=torch.long, device=device)  # (R, length)
        self.ids = torch.zeros((rows, 1), dtype=torch.long, device=device)
        self.positions = torch.zeros((rows, 1), dtype=torch.long, device=device)
        self.prompt_length = 0  # positions filled by the prefill
        self.filled = 0  # positions filled so far
        self._forward = _one_token
        self._cache_argument = cache_argument(lm)  # a constant to a compiled step: no recompiles
        if compile:
            # the step's inputs live at fixed addresses: a CUDA graph reads them in place
            for t in (self.mask, self.ids, self.positions):
                torch._dynamo.mark_static_address(t)
            self._forward = torch.compile(_one_token, **compile_options(device))

    def matches(self, rows: int, length: int, dtype: torch.dtype, device: torch.device, compile: bool) -> bool:
        return (self.rows, self.length, self.dtype, self.device, self.compiled) == (rows, length, dtype, device, compile)

    def start(self, prefill, mask: torch.Tensor, positions: torch.Tensor, repeat: int = 1) -> None:
        """Take over a prefill: `prefill` is the cache of (rows / repeat) prompts, each
        repeated `repeat` times (its beams) in the static rows, as are `mask` and `positions`."""
        self.cache.reset()
        for i, layer in enumerate(prefill.layers):
            keys, values = layer.keys, layer.values  # (B, H, T, D)
            if repeat > 1:
                keys, values = keys.repeat_interleave(repeat, 0), values.repeat_interleave(repeat, 0)
            self.cache.update(keys, values, i)  # writes positions [0, T), allocates on first use
        prompt = mask.shape[1]
        self.mask.zero_()
        self.mask[:, :prompt] = mask.repeat_interleave(repeat, 0)
        self.positions.copy_(positions[:, -1:].repeat_interleave(repeat, 0) + 1)
        self.prompt_length = self.filled = prompt

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (R,) at the next position -> (R, V) float logits."""
        if self.filled >= self.length:
            raise RuntimeError(f"static cache of {self.length} positions is full")
        self.ids.copy_(token[:, None])
        self.mask[:, self.filled] = 1
        if self.compiled:
            # the previous step's logits (a CUDA graph output) have been consumed: let the
            # graph overwrite them instead of keeping them alive
            torch.compiler.cudagraph_mark_step_begin()
        logits = self._forward(self._lm(), self.cache, self.ids, self.mask, self.positions, self._cache_argument)
        self.filled += 1
        self.positions.add_(1)
        return logits

    def reorder(self, rows: torch.Tensor) -> None:
        """Beam search: row i continues from row `rows[i]` (a beam of the same image).

        Only the generated positions are copied, in place; prefix and prompt are the same
        for all beams of an image, and so are the mask and positions of its rows.
        """
        lo, hi = self.prompt_length, self.filled
        if hi == lo:
            return
        for layer in self.cache.layers:
            for buf in (layer.keys, layer.values):
                part = buf[:, :, lo:hi]  # (R, H, generated, D), a view into the cache
                part.copy_(part.index_select(0, rows))

    def buffers(self) -> list[torch.Tensor]:
        """Every tensor a step writes; their addresses never change (tests check this)."""
        out = [self.mask, self.ids, self.positions]
        for layer in self.cache.layers:
            if layer.keys is not None:
                out += [layer.keys, layer.values]
        return out


def static_state(lm, rows: int, length: int, dtype: torch.dtype, device: torch.device, compile: bool) -> StaticState:
    """The LM's state for this shape: the last one when it matches, else a new one (the old
    one is dropped first, so only one cache is ever held per LM)."""
    length = -(-length // LENGTH_STEP) * LENGTH_STEP
    state = _STATES.get(lm)
    if state is None or not state.matches(rows, length, dtype, device, compile):
        _STATES.pop(lm, None)
        state = StaticState(lm, rows, length, dtype, device, compile)
        _STATES[lm] = state
    return state
