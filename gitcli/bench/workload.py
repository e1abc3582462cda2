"""What a benchmark runs: the model options plus the workload, and building that model."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from gitcli.config import ModelConfig, require_at_least_one
from gitcli.errors import GitcapError


@dataclass
class BenchConfig:
    """One benchmark run. Training reads `caption_tokens`; decoding `beams`, `max_new_tokens`."""

    model: ModelConfig = field(default_factory=ModelConfig)
    device: str = "auto"
    precision: str | None = None  # None: bf16 on GPUs that have it, fp32 on CPU
    batch_size: int = 32
    steps: int = 10  # timed iterations; the median is reported
    warmup: int = 3
    caption_tokens: int = 20
    beams: int = 3
    max_new_tokens: int = 20
    lm_layers: int | None = None  # shrink a named LM to this depth (sizing, tests)
    compile: bool = False  # train: torch.compile the LM; generate: the one-token decoding step
    cached_features: bool = False  # train from precomputed tower features (train --cache-features)
    cache: str = "dynamic"  # generate: the KV cache, as GenerationConfig.cache
    # generate: "gitcap" (ours) or "transformers" (`generate()` on the same model and inputs,
    # the reference the decoder's speed is judged against, timed in the same run)
    decoder: str = "gitcap"
    peak_tflops: float | None = None  # the device's peak, when gitcap's table lacks it
    profile: bool = False  # after timing, profile two more iterations by operator
    seed: int = 0

    def validate(self) -> None:
        require_at_least_one(self, "batch_size", "steps", "caption_tokens", "beams", "max_new_tokens")
        if self.warmup < 0:
            raise GitcapError("--warmup must be >= 0")
        if self.lm_layers is not None and self.lm_layers < 1:
            raise GitcapError("--lm-layers must be at least 1")
        if self.lm_layers is not None and self.model.preset is not None:
            raise GitcapError("--lm-layers shrinks a named LM architecture; the tiny preset has its own size")
        if self.decoder not in ("gitcap", "transformers"):
            raise GitcapError(f"--decoder must be gitcap or transformers, not {self.decoder!r}")
        if self.decoder == "transformers" and (self.cache != "dynamic" or self.compile):
            raise GitcapError("--cache and --compile choose how gitcap's decoder runs; --decoder transformers "
                              "times generate() as it comes")
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            raise GitcapError("--peak-tflops must be positive")
        if self.cached_features and self.model.train_vision:
            raise GitcapError("--cached-features needs a frozen vision tower: features of a trained tower would go "
                              "stale (drop --train-vision; the tiny preset trains its tower)")


def build_bench_model(cfg: BenchConfig, device: torch.device, compile_lm: bool = True):
    """The captioner `cfg` describes, random weights throughout, on `device`.

    Named LMs are built from their config (gitcli.bench.architectures), never downloaded;
    the tokenizer is not needed (token ids are drawn at random), so the captioner has none.
    """
    from gitcli.bench.architectures import build_random_lm, lm_config
    from gitcli.model.captioner import assemble_captioner, build_captioner
    from gitcli.model.lm import storage_dtype
    from gitcli.model.vision import create_clip_visual

    model_cfg = cfg.model
    model_cfg.vision_pretrained = None  # random weights: nothing to fetch
    model_cfg.validate()
    torch.manual_seed(cfg.seed)
    if model_cfg.preset == "tiny":
        captioner = build_captioner(model_cfg, device=device)
    else:
        config = lm_config(model_cfg.lm, layers=cfg.lm_layers)  # an unknown name fails before anything builds
        dtype = storage_dtype(model_cfg.dtype, device)
        visual = create_clip_visual(model_cfg.vision, None)
        # the LM draws from its own seed, so the mapping built after it is the same whatever
        # the LM's format (whose loading may draw numbers of its own)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(cfg.seed + 1)
            lm = build_random_lm(config, dtype=dtype, quant=model_cfg.quant, device=device)
        captioner = assemble_captioner(model_cfg, visual, lm, None, device=device, dtype=dtype)
    if cfg.compile and compile_lm:
        captioner.lm.compile()  # in place: the module's forward goes through torch.compile
    return captioner


def random_batch(captioner, batch: int, tokens: int, seed: int, device: torch.device):
    """Images and caption ids drawn at random: (B, 3, H, W) pixels, (B, T) ids."""
    g = torch.Generator().manual_seed(seed)
    h, w = captioner.vision.image_size
    pixels = torch.randn(batch, 3, h, w, generator=g)
    vocab = captioner.lm.get_input_embeddings().num_embeddings
    ids = torch.randint(3, vocab, (batch, tokens), generator=g)  # above the usual special ids
    return pixels.to(device), ids.to(device)
