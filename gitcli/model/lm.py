"""Loading the causal language model and its tokenizer: dtype, quantisation, offline-first."""

from __future__ import annotations

from pathlib import Path

import torch

from gitcli.errors import GitcapError
from gitcli.model.hub import did_you_mean, hub_reachable, quiet_loggers

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def storage_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto`: frozen weights in bf16 (fp16 without bf16 support) on GPUs, fp32 on CPU."""
    if dtype != "auto":
        return TORCH_DTYPES[dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def lm_suggestion(name: str) -> str:
    """' (did you mean gpt2?)' when `name` is a close misspelling of an LM alias or its hub id."""
    from gitcli.config import LM_ALIASES

    return did_you_mean(name, [*LM_ALIASES, *LM_ALIASES.values()])


def _offline_hint(name: str) -> str:
    close = lm_suggestion(name)
    if close:
        return f"unknown LM {name!r}{close}: it is no local directory and not in the Hugging Face cache"
    return (
        f"cannot load {name!r}: it is not a local directory and not in the Hugging Face cache, and "
        "the hub could not be reached. Download it where there is internet "
        f"(`hf download {name} --local-dir DIR`) and pass the directory instead"
    )


def _from_pretrained(loader, name: str, **kwargs):
    """Local directory or cache first; the hub only when the cache has nothing."""
    with quiet_loggers("transformers", "huggingface_hub"):
        return _load(loader, name, **kwargs)


def _load(loader, name: str, **kwargs):
    try:
        if Path(name).is_dir():
            return loader(name, **kwargs)
        if Path(name).exists() or name.startswith((".", "/")):
            raise GitcapError(f"{name!r} is not a model directory")
        try:
            return loader(name, local_files_only=True, **kwargs)
        except OSError:
            if not hub_reachable():  # one quick check instead of a minute of retried requests
                raise GitcapError(_offline_hint(name)) from None
        try:
            return loader(name, **kwargs)
        except OSError:
            raise GitcapError(f"cannot load {name!r} from the hub{lm_suggestion(name)}: no such model, or no "
                              "access to it (a gated model needs `hf auth login`)") from None
    except ValueError as exc:  # e.g. an architecture transformers does not know
        raise GitcapError(f"cannot load {name!r} as a causal LM: {str(exc).splitlines()[0]}") from None


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    tokenizer = _from_pretrained(AutoTokenizer.from_pretrained, name_or_path)
    if tokenizer.eos_token_id is None:
        raise GitcapError(f"the tokenizer of {name_or_path!r} has no end-of-sequence token")
    if tokenizer.pad_token_id is None:
        # Padding is masked out of attention and loss, so any id works; EOS is conventional.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_lm(name_or_path: str, *, dtype: torch.dtype, quant: str, device: torch.device, keep_dense: bool = False):
    """Load a transformers causal LM on `device`: `bnb-int8` through BitsAndBytesConfig while
    loading, torchao's formats after (gitcli.model.quant)."""
    from transformers import AutoModelForCausalLM

    from gitcli.model.quant import check_quant_device, quantise_lm

    check_quant_device(quant, device)
    kwargs: dict = {"dtype": dtype}
    if quant == "bnb-int8":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["device_map"] = {"": device}
    model = _from_pretrained(AutoModelForCausalLM.from_pretrained, name_or_path, **kwargs)
    if quant != "bnb-int8":
        model.to(device)
    return quantise_lm(model, quant, keep_dense=keep_dense)
