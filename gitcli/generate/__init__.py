"""Decoding: greedy, sampling and beam search over the image prefix, with a KV cache."""

from gitcli.generate.decode import Generation, generate

__all__ = ["Generation", "generate"]
