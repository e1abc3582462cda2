"""Loading the causal language model and its tokenizer: dtype, 8-bit, offline-first."""

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


def _check_int8_backend(device: torch.device) -> None:
    """bitsandbytes builds without a CPU backend can only run int8 on CUDA: say so up front."""
    if device.type == "cuda":
        return
    try:
        import bitsandbytes as bnb

        layer = bnb.nn.Linear8bitLt(4, 4, has_fp16_weights=False).to(device)
        layer(torch.zeros(1, 4))
    except Exception as exc:  # any failure here means: no int8 on this device
        raise GitcapError(f"--int8 needs a CUDA GPU with this bitsandbytes build ({str(exc).splitlines()[0][:120]})") from None


def load_lm(name_or_path: str, *, dtype: torch.dtype, int8: bool, device: torch.device):
    """Load a transformers causal LM; 8-bit through BitsAndBytesConfig when asked."""
    from transformers import AutoModelForCausalLM

    kwargs: dict = {"dtype": dtype}
    if int8:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise GitcapError("--int8 needs bitsandbytes (pip install bitsandbytes)") from None
        from transformers import BitsAndBytesConfig

        _check_int8_backend(device)
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["device_map"] = {"": device}
    model = _from_pretrained(AutoModelForCausalLM.from_pretrained, name_or_path, **kwargs)
    if not int8:
        model.to(device)
    return model
