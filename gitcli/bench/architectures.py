"""Random-weight LMs that `gitcap bench` builds from the shared architecture table
(`gitcli.model.architectures`): nothing is downloaded."""

from __future__ import annotations

import torch

from gitcli.errors import GitcapError
from gitcli.model.architectures import LM_ARCHITECTURES, lm_config  # noqa: F401  (bench's public names)


def build_random_lm(config, *, dtype: torch.dtype, quant: str, device: torch.device):
    """A causal LM of `config` with random weights, on `device` in `dtype`, quantised as `quant`
    says (gitcli.model.quant). The same seed gives the same weights before quantising, in
    every format, so formats can be compared token for token."""
    from gitcli.model.quant import check_quant_device, quantise_lm

    with torch.random.fork_rng(devices=[]):  # the check may build a layer: not from the model's draws
        check_quant_device(quant, device)
    if quant == "bnb-int8":
        return _through_bitsandbytes(config, dtype, device)
    return quantise_lm(_dense_lm(config, dtype, device), quant)


def _dense_lm(config, dtype: torch.dtype, device: torch.device):
    from transformers import AutoModelForCausalLM

    try:
        # built directly in its storage dtype on its device: a 7B LM never exists in fp32
        with torch.device(device):
            return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    except ValueError as exc:  # e.g. a config.json of a model type that is no causal LM
        raise GitcapError(f"cannot build a causal LM from this config: {str(exc).splitlines()[0]}") from None


def _through_bitsandbytes(config, dtype: torch.dtype, device: torch.device):
    """8-bit as users get it: the weights saved in fp16, then loaded through BitsAndBytesConfig."""
    import tempfile

    from gitcli.model.lm import load_lm
    from gitcli.model.quiet import quiet_libraries

    quiet_libraries()
    with tempfile.TemporaryDirectory(prefix="gitcap-bench-") as tmp:
        dense = _dense_lm(config, dtype, device)
        dense.to(torch.float16).save_pretrained(tmp)
        del dense  # the dense copy leaves the device before the 8-bit one arrives
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return load_lm(tmp, dtype=torch.float16, quant="bnb-int8", device=device).eval()
