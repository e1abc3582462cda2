"""Random-weight LMs that `gitcap bench` builds from the shared architecture table
(`gitcli.model.architectures`): nothing is downloaded."""

from __future__ import annotations

import torch

from gitcli.errors import GitcapError
from gitcli.model.architectures import LM_ARCHITECTURES, lm_config  # noqa: F401  (bench's public names)


def build_random_lm(config, *, dtype: torch.dtype, int8: bool, device: torch.device):
    """A causal LM of `config` with random weights, on `device` in `dtype` (or 8-bit)."""
    from transformers import AutoModelForCausalLM

    try:
        if not int8:
            # built directly in its storage dtype on its device: a 7B LM never exists in fp32
            with torch.device(device):
                return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
        return _int8_lm(config, device)
    except ValueError as exc:  # e.g. a config.json of a model type that is no causal LM
        raise GitcapError(f"cannot build a causal LM from this config: {str(exc).splitlines()[0]}") from None


def _int8_lm(config, device: torch.device):
    """8-bit as users get it: fp16 weights saved, then loaded through BitsAndBytesConfig."""
    import tempfile

    from transformers import AutoModelForCausalLM

    from gitcli.model.lm import load_lm

    with tempfile.TemporaryDirectory(prefix="gitcap-bench-") as tmp:
        AutoModelForCausalLM.from_config(config, dtype=torch.float16).save_pretrained(tmp)
        return load_lm(tmp, dtype=torch.float16, int8=True, device=device).eval()
