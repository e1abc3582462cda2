"""Everything a running server needs to know, typed (the CLI fills it from its options)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from gitcli.config import GenerationConfig, require_at_least_one
from gitcli.errors import GitcapError

SCHEDULERS = ("continuous", "whole")
# `gitcap caption` and `gitcap ask` stop at these by default; a server whose
# --max-new-tokens is not given answers what they print.
CAPTION_MAX_NEW_TOKENS = 20
ANSWER_MAX_NEW_TOKENS = 10


@dataclass
class ServeConfig:
    model_id: str = "gitcap"
    # decoding defaults a request may override; max_new_tokens None = caption 20, answer 10
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    max_new_tokens: int | None = None
    # sampling seed of a request that gives none; None = a fresh one per request (as OpenAI's
    # API: asking again samples again), an int = every such request draws the same
    seed: int | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    # rows decoded together: 64 gave a quarter more requests/s than 32 at 64 streaming
    # clients on a 2-core CPU (the per-step cost is shared by more rows)
    max_batch_size: int = 64
    # newcomers prefilled together (prompts of one length). 1 = each alone, as caption does one
    # image; more prefills a burst of arrivals at once (the image tower dominates a prefill):
    # 8 doubled the engine's throughput at 64 clients on a 2-core CPU and 16 added a sixth, with
    # the same tokens; 32 was no faster and made a prefill step long enough to hold back the
    # short requests of a mixed load.
    prefill_batch: int = 16
    # engine steps a newcomer to a running batch may wait for others to prefill with (see
    # gitcli.generate.continuous); 0 = join at the next step. At 64 streaming clients on a
    # 2-core CPU, 1 and 3 both gave about a fifth more requests/s than 0; 3 made the short
    # requests of a mixed load wait longer, so 1.
    max_waiting_steps: int = 1
    max_queue: int = 256  # requests waiting for a row; one more gets 503
    max_image_bytes: int = 20_000_000
    max_image_pixels: int = 40_000_000  # width * height of a decoded image
    api_key: str | None = None
    allow_image_urls: bool = False
    scheduler: str = "continuous"
    precision: str = "fp32"

    def validate(self) -> None:
        self.generation.validate()
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise GitcapError("--max-new-tokens must be at least 1")
        if self.scheduler not in SCHEDULERS:
            raise GitcapError(f"--scheduler must be one of {', '.join(SCHEDULERS)}, not {self.scheduler!r}")
        require_at_least_one(self, "max_batch_size", "prefill_batch", "max_queue", "max_image_bytes")
        if self.max_waiting_steps < 0:
            raise GitcapError("--max-waiting-steps must be at least 0")
        if not 0 <= self.port <= 65535:
            raise GitcapError(f"--port must be between 0 and 65535, not {self.port}")
        if self.api_key is not None and not self.api_key.strip():
            raise GitcapError("--api-key is empty")

    def default_max_new_tokens(self, question: str | None) -> int:
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        return CAPTION_MAX_NEW_TOKENS if question is None else ANSWER_MAX_NEW_TOKENS


def is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """What to warn about before binding: anyone who reaches a non-loopback address
    can use the model when no key is asked for."""
    if api_key or is_loopback(host):
        return None
    return (f"binding {host} without --api-key: anyone who can reach this address can use the model "
            "(set --api-key or GITCAP_API_KEY)")
