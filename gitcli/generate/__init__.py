"""Decoding: greedy, sampling and beam search over the image prefix, with a KV cache.

`generate_for_images` is the one step from (images, questions) to text; `prepare_inputs`
and `decode_tokens` are its two halves, for callers that schedule decoding themselves.
"""

from gitcli.generate.decode import Generation, decode_tokens, generate
from gitcli.generate.images import generate_for_images
from gitcli.generate.inputs import prepare_inputs, prompts_for

__all__ = ["Generation", "decode_tokens", "generate", "generate_for_images", "prepare_inputs", "prompts_for"]
