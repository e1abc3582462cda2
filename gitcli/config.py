"""Typed configuration: model, generation; aliases; JSON round trip.

Standard library only, so every layer (and torch-free commands) can import it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gitcli.errors import GitcapError

# OpenAI's spellings and the names people type, mapped to open_clip model names.
VISION_ALIASES = {
    "ViT-B/32": "ViT-B-32",
    "ViT-B/16": "ViT-B-16",
    "ViT-L/14": "ViT-L-14",
    "ViT-L/14@336px": "ViT-L-14-336",
    "RN50": "RN50",
    "RN101": "RN101",
    "RN50x4": "RN50x4",
}

# Short LM names users type, mapped to real hub ids.
LM_ALIASES = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
    "opt-125m": "facebook/opt-125m",
    "opt-350m": "facebook/opt-350m",
    "opt-1.3b": "facebook/opt-1.3b",
    "opt-2.7b": "facebook/opt-2.7b",
    "opt-6.7b": "facebook/opt-6.7b",
    "llama-7b": "huggyllama/llama-7b",
}

MAPPINGS = ("linear", "linear-ln", "mlp", "transformer")
# Far above any real model, low enough that a hostile gitcap.json cannot ask for terabytes.
MAX_PREFIX_LENGTH, MAX_MAPPING_LAYERS, MAX_LORA_RANK = 1024, 64, 4096
DTYPES = ("auto", "fp32", "fp16", "bf16")
# how the frozen LM's linear layers are stored (gitcli.model.quant); "none": in --dtype
QUANT_FORMATS = ("none", "bnb-int8", "int8-weight", "int8-dynamic", "fp8")
TORCHAO_FORMATS = ("int8-weight", "int8-dynamic", "fp8")  # quantised by torchao after loading
PRECISIONS = ("fp32", "bf16", "fp16")
PRESETS = ("tiny",)

# Names under which the tiny preset's parts are recorded; they exist nowhere but in a
# checkpoint, so they are always saved whole.
TINY_VISION = "gitcap-tiny-vit"
TINY_LM = "gitcap-tiny-lm"
# The tiny preset's word-level vocabulary: every word of the built-in synthetic set
# (gitcli.data.synthetic draws its scenes' words from it). It sits here, below both
# `model` (which builds the tokenizer from it) and `data`, which may not import each other.
TINY_VOCABULARY = (
    "red", "green", "blue", "yellow", "purple", "white",  # colours
    "circle", "square", "triangle",  # shapes
    "left", "middle", "right",  # columns
    "zero", "one", "two", "three",  # counts
    "a", "on", "the", "in", "and", "shapes", "how", "many", "are", "there", "what",
    "color", "is", "shape", "where", "yes", "no", "?", "question", ":", "answer",
)

DEFAULT_QUESTION_TEMPLATE = "Question: {question} Answer:"


def require_at_least_one(config: Any, *fields: str) -> None:
    """Refuse a count option below 1, named as the user typed it (max_queue -> --max-queue)."""
    for name in fields:
        if getattr(config, name) < 1:
            raise GitcapError(f"--{name.replace('_', '-')} must be at least 1")


def check_quant_name(quant: str) -> None:
    if quant not in QUANT_FORMATS:
        raise GitcapError(f"unknown --quant {quant!r}; choose one of {', '.join(QUANT_FORMATS)}")


def resolve_vision_name(name: str) -> str:
    """`ViT-L/14` -> `ViT-L-14`; open_clip names pass through unchanged."""
    return VISION_ALIASES.get(name, name)


def resolve_lm_name(name: str) -> str:
    """`opt-2.7b` -> `facebook/opt-2.7b`; hub ids and local paths pass through."""
    return LM_ALIASES.get(name, name)


@dataclass
class ModelConfig:
    """Everything needed to rebuild a captioner; saved as `gitcap.json` in a checkpoint."""

    vision: str = "ViT-B-32"
    # an open_clip pretrained tag, a local weights file, or None for random weights
    vision_pretrained: str | None = "openai"
    grid: bool = False  # patch grid instead of the pooled embedding
    mapping: str = "mlp"
    prefix_length: int = 10  # only for mlp / transformer; linear maps token for token
    mapping_layers: int = 8  # transformer mapper depth
    lm: str = "gpt2"
    quant: str = "none"  # one of QUANT_FORMATS
    dtype: str = "auto"  # storage dtype of frozen weights
    caption_prompt: str = ""  # text between the image prefix and the caption
    question_template: str = DEFAULT_QUESTION_TEMPLATE
    preset: str | None = None
    # what was trained, so a checkpoint knows which weights it carries
    train_vision: bool = False
    lora_rank: int = 0
    lora_alpha: int = 16
    train_lm: bool = False

    def __post_init__(self) -> None:
        self.vision = resolve_vision_name(self.vision)
        self.lm = resolve_lm_name(self.lm)

    def validate(self) -> None:
        """Refuse combinations that cannot work, before anything heavy loads."""
        if self.mapping not in MAPPINGS:
            raise GitcapError(f"unknown mapping {self.mapping!r}; choose one of {', '.join(MAPPINGS)}")
        if self.dtype not in DTYPES:
            raise GitcapError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        check_quant_name(self.quant)
        if self.preset is not None and self.preset not in PRESETS:
            raise GitcapError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        if self.mapping == "mlp" and self.grid:
            raise GitcapError(
                "the mlp mapping reads the pooled embedding; use --mapping linear, linear-ln "
                "or transformer with --grid"
            )
        if self.mapping in ("mlp", "transformer") and self.prefix_length < 1:
            raise GitcapError("--prefix-length must be at least 1")
        if self.mapping == "transformer" and self.mapping_layers < 1:
            raise GitcapError("the transformer mapping needs at least one layer")
        if self.lora_rank < 0:
            raise GitcapError("--lora must be a positive rank")
        if self.prefix_length > MAX_PREFIX_LENGTH or self.mapping_layers > MAX_MAPPING_LAYERS:
            raise GitcapError(f"--prefix-length is at most {MAX_PREFIX_LENGTH} and the mapping at most "
                              f"{MAX_MAPPING_LAYERS} layers deep")
        if self.lora_rank > MAX_LORA_RANK:
            raise GitcapError(f"--lora takes a rank of at most {MAX_LORA_RANK}")
        # The template is filled by plain replacement, never str.format: a placeholder such as
        # {question.__class__} or {question:>99999} could read attributes or build a huge prompt.
        rest = self.question_template.replace("{question}", "")
        if "{question}" not in self.question_template or "{" in rest or "}" in rest:
            raise GitcapError("the question template must contain the placeholder {question} and no other braces, "
                              f"not {self.question_template[:80]!r}")

    def validate_for_training(self) -> None:
        """What only matters when weights are about to train."""
        self.validate()
        if self.quantised and self.train_lm:
            raise GitcapError(f"a quantised LM (--quant {self.quant}) cannot be fully tuned; "
                              "use --lora R instead of --train-lm")

    @property
    def quantised(self) -> bool:
        return self.quant != "none"

    @property
    def lm_trained(self) -> bool:
        return self.train_lm or self.lora_rank > 0


GENERATION_CACHES = ("dynamic", "static")


@dataclass
class GenerationConfig:
    """Decoding options shared by caption, ask and infer-tsv."""

    max_new_tokens: int = 20
    beams: int = 1
    temperature: float = 0.0  # 0 = deterministic (greedy or beam search)
    top_p: float = 1.0
    length_penalty: float = 1.0
    seed: int = 0
    # "dynamic": the cache grows per step and finished rows leave the batch; "static": one
    # preallocated cache with fixed shapes (see gitcli.generate.decode for the trade-off).
    # Dynamic is the default: static holds its cache after the call, runs finished rows to
    # the end and attends over the whole preallocated length, so it is not always faster
    # (transformers' own static cache was slower than its dynamic one for beam search on
    # an H200); its gain comes with --compile on a GPU, which costs a compile per shape.
    cache: str = "dynamic"
    compile: bool = False  # torch.compile the one-token step (a CUDA graph on GPUs); static only

    def validate(self) -> None:
        if self.cache not in GENERATION_CACHES:
            raise GitcapError(f"--cache must be one of {', '.join(GENERATION_CACHES)}, not {self.cache!r}")
        if not isinstance(self.compile, bool):
            raise GitcapError(f"compile must be true or false, not {self.compile!r}")
        if self.compile and self.cache != "static":
            raise GitcapError("--compile needs --cache static: a growing cache changes shape every step")
        require_at_least_one(self, "max_new_tokens", "beams")
        if self.temperature < 0:
            raise GitcapError("--temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise GitcapError("--top-p must be in (0, 1]")
        if self.beams > 1 and self.temperature > 0:
            raise GitcapError("sampling (--temperature > 0) and beam search (--beams > 1) are exclusive")

    @property
    def sampling(self) -> bool:
        return self.temperature > 0


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def upgrade_model_fields(model: Any, what: str) -> Any:
    """A model config saved before `--quant` says `"int8": true|false`: `"quant": "bnb-int8"|"none"` now."""
    if not isinstance(model, dict) or "int8" not in model:
        return model
    model = dict(model)
    int8 = model.pop("int8")
    if not isinstance(int8, bool):
        raise GitcapError(f"{what}: field 'int8' must be bool, not {json.dumps(int8)[:60]}")
    if "quant" in model:
        raise GitcapError(f"{what} has both 'int8' and 'quant'")
    model["quant"] = "bnb-int8" if int8 else "none"
    return model


def from_dict(cls: type, data: dict[str, Any], *, what: str = "config") -> Any:
    """Build a dataclass from a dict, refusing unknown keys (a file from something else)."""
    if not isinstance(data, dict):
        raise GitcapError(f"{what} is not a JSON object")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise GitcapError(f"{what} has unknown fields: {', '.join(unknown)}")
    check_field_types(cls, data, what=what)
    return cls(**data)


_JSON_TYPES = {  # annotation name -> test; bool is not an int here, though Python says it is
    "str": lambda v: isinstance(v, str),
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "bool": lambda v: isinstance(v, bool),
    "None": lambda v: v is None,
}


def check_field_types(cls: type, data: dict[str, Any], *, what: str) -> None:
    """Refuse a value whose JSON type is not the field's (`"grid": "yes"`, `"lm": [...]`), in
    one line naming the field: a file from elsewhere must not reach code that trusts types."""
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        allowed = [name.strip() for name in str(f.type).split("|")]
        if any(name not in _JSON_TYPES for name in allowed):
            continue  # a type JSON cannot spell plainly: left to the field's own checks
        value = data[f.name]
        if not any(_JSON_TYPES[name](value) for name in allowed):
            expected = " or ".join("null" if name == "None" else name for name in allowed)
            raise GitcapError(f"{what}: field {f.name!r} must be {expected}, not {json.dumps(value)[:60]}")


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically and durably: a reader sees the old file or the new one, never half."""
    from gitcli.formats.atomic import write_json as write_json_atomic

    write_json_atomic(path, data)


def read_json(path: Path, *, what: str | None = None) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GitcapError(f"{what or 'file'} not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise GitcapError(f"{what or path} is not valid JSON: {exc}") from None


SCHEDULES = ("cosine", "linear", "constant")


@dataclass
class DataConfig:
    """Where training (and validation) examples come from."""

    source: str = "synthetic"  # synthetic | shard folder/pattern | CC TSV | GIT image TSV | VQA questions JSON
    synthetic_size: int = 2000
    synthetic_seed: int = 0
    image_root: str | None = None  # CC TSV: folder of %08d.jpg; VQA: COCO image folder
    captions: str | None = None  # GIT caption TSV beside a GIT image TSV
    questions: str | None = None  # VQA questions JSON
    annotations: str | None = None  # VQA annotations JSON
    images: str | None = None  # VQA: GIT image TSV instead of an image folder
    task: str = "both"  # synthetic: captions, vqa or both
    questions_per_scene: int = 0  # synthetic: questions drawn per scene (0 = all)
    max_target_tokens: int = 32
    num_workers: int = 2


@dataclass
class TrainConfig:
    """Optimisation, launch and output options of `gitcap train`."""

    output_dir: str = "runs/gitcap"
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 32  # per device
    grad_accum: int = 1
    lr: float = 1e-4
    warmup_steps: int = 0
    schedule: str = "cosine"
    weight_decay: float = 0.0
    clip_grad: float | None = 1.0
    grad_checkpointing: bool = False
    seed: int = 0
    device: str = "auto"
    precision: str | None = None
    save_every: int = 1000
    keep_last: int = 2
    log_every: int = 10
    val_data: str | None = None
    val_samples: int = 200
    val_synthetic_seed: int = 1
    resume: bool = False
    init_from: str | None = None
    zero: int | None = None  # DeepSpeed ZeRO stage; None = plain PyTorch (DDP under torchrun)
    offload: bool = False
    deepspeed_config: str | None = None
    report_to: str | None = None
    max_nonfinite: int = 20  # consecutive non-finite losses before giving up
    cache_features: str | None = None  # directory of the frozen tower's precomputed features
    bucket_by_length: bool = False  # batches of similar text length (less padding)
    compile: bool = False  # torch.compile the LM's forward (in place: checkpoints are unchanged)

    def validate(self) -> None:
        if self.schedule not in SCHEDULES:
            raise GitcapError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise GitcapError("--batch-size and --grad-accum must be at least 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise GitcapError("--max-steps must be at least 1")
        if self.epochs < 1:
            raise GitcapError("--epochs must be at least 1")
        if self.lr <= 0:
            raise GitcapError("--lr must be positive")
        if self.zero is not None and self.zero not in (0, 1, 2, 3):
            raise GitcapError("--zero takes a stage: 0, 1, 2 or 3")
        if self.offload and (self.zero or 0) < 2:
            raise GitcapError("--offload needs --zero 2 or 3")
        if self.keep_last < 1:
            raise GitcapError("--keep-last must be at least 1")
        if self.report_to not in (None, "tensorboard", "wandb"):
            raise GitcapError("--report-to takes tensorboard or wandb")
