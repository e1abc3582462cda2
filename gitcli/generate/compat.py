"""What differs between the transformers versions gitcap runs on, for the decoder."""

from __future__ import annotations

import functools
import inspect


@functools.lru_cache(maxsize=None)
def _cache_argument_of(forward_owner: type) -> str:
    params = inspect.signature(forward_owner.forward).parameters  # follows the deprecation wrapper
    return "cache" if "cache" in params else "past_key_values"


def cache_argument(lm) -> str:
    """The name under which this LM's forward takes the KV cache.

    transformers 5.2x renamed `past_key_values` to `cache` and warns on every call with the
    old name (a FutureWarning per decoded token, until 5.40 removes it); older versions
    know only `past_key_values`. A peft wrapper passes the argument through to its base.
    """
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    return _cache_argument_of(type(base))
