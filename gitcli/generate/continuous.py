"""Continuous (iteration-level) batching: requests join and leave a running batch.

A server cannot wait for a batch to finish before starting the next: a short caption
would sit behind a long answer. Here every decoding step is one token for each running
row, and between two steps
- a newcomer is prefilled alone (image prefix + prompt, exactly the one-image batch of
  `gitcap caption`), picks its first token from that prefill, and its KV cache is merged
  into the running batch, left-padded to the batch's length. With `max_prefill_batch` > 1,
  newcomers that arrive together and whose prompts have one length are prefilled as one
  batch without padding (the image tower dominates a prefill, so a burst of arrivals
  costs little more than one); their rows then join the batch the same way;
- a row that emitted EOS, reached its own `max_new_tokens`, was cancelled or failed leaves
  at once, and columns of padding that no remaining row needs are trimmed off the left.
Positions are kept per row, so padding never shifts a row's positions: greedy decoding is
token for token what the row decodes alone. Sampling draws from a generator seeded per
request (its `seed`), so a sampled request also draws what it would alone.

Beam-search requests (`beams > 1`) do not join the token-level batch: a beam search keeps
2*beams candidates per image and reorders its cache every step. They are grouped by
decoding options and each group is decoded whole by the batch decoder of
`gitcli.generate.decode`, between two continuous steps (one group per step, so running
rows keep advancing between groups). The running rows wait while a group decodes.

The engine holds a dynamic cache (rows change every step); `cache="static"` and `compile`
only apply to beam groups, which decode with fixed shapes.

With `max_waiting_steps` > 0, newcomers to a running batch wait for company, as TGI's
router does (its `max_waiting_tokens`): a prefill costs about the same for one image as
for several, and every running row waits while it runs. They are admitted once they fill a
prefill group (or every free row), or when the first of them has waited that many steps. An
idle engine admits at once, so a quiet server never makes a request wait.

`mode="whole"` admits new requests only when the running batch is empty: batches run to
completion before the next starts, the baseline continuous batching is measured against.

Threading: `submit` and `Job.cancel` may be called from any thread; `step` only from the
one thread that owns the engine (a server runs it in its own thread; torch releases the
GIL while it computes).
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from gitcli.config import GenerationConfig
from gitcli.data.text import encode_prompts
from gitcli.generate.decode import generate, lm_step, new_cache, pick_tokens
from gitcli.generate.inputs import prepare_inputs

ENGINE_MODES = ("continuous", "whole")


class JobRejected(Exception):
    """The request cannot be decoded as asked (a client mistake, not a server fault)."""


@dataclass(eq=False)
class Job:
    """One request: an image (already transformed to a (3, H, W) tensor), the text after its
    prefix, and its decoding options. Callbacks run on the engine's thread."""

    pixel_values: torch.Tensor
    prompt: str
    config: GenerationConfig
    on_token: Callable[["Job", int], None] | None = None  # each generated token (not the EOS that ends it)
    on_finish: Callable[["Job"], None] | None = None  # once, when the job ends in any way
    # decode max_new_tokens tokens even past EOS (vLLM's `ignore_eos`, which serving
    # benchmarks use to fix output lengths); rows of the token-level batch only, not beam groups
    ignore_eos: bool = False
    tokens: list[int] = field(default_factory=list)
    text: str | None = None  # set when it finished
    finish_reason: str | None = None  # "stop" (EOS), "length", "cancelled", "error"
    error: str | None = None
    rejected: bool = False  # the error is the request's fault (bad options), not the server's
    prompt_tokens: int = 0  # image prefix + prompt positions
    _cancelled: bool = False

    def cancel(self) -> None:
        """Leave the batch at the next step (the client went away)."""
        self._cancelled = True

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


# ---- the decoder's pieces the engine uses ------------------------------------------
class _Decoder:
    """Prefill a few images, one batched one-token step, one pick, one beam group: the
    batch decoder's own public pieces (`gitcli.generate.inputs` prepares the inputs
    exactly as `generate` does, `gitcli.generate.decode` steps and picks), so a row
    decodes here as it would in `gitcap caption`.
    """

    def __init__(self, captioner):
        self.captioner = captioner
        self.lm = captioner.lm
        self.tokenizer = captioner.tokenizer
        self.eos = self.tokenizer.eos_token_id

    def prefill(self, pixel_values: torch.Tensor, prompts: list[str]):
        """Images (N, 3, H, W) with their prompts, as `generate` prefills a batch (one image:
        exactly `gitcap caption` on one image).
        -> (cache, mask (N, T), next position (N, 1), logits (N, V))."""
        prefix = self.captioner.image_prefix(pixel_values.to(self.captioner.device))  # (N, P, D)
        embeds, mask, positions = prepare_inputs(self.captioner, prefix, prompts)
        cache = new_cache(self.lm)
        logits = lm_step(self.lm, cache, mask, positions, embeds=embeds)
        return cache, mask, positions[:, -1:] + 1, logits

    def step(self, cache, mask, positions, tokens):
        return lm_step(self.lm, cache, mask, positions, ids=tokens[:, None])

    def pick(self, logits: torch.Tensor, config: GenerationConfig, generator) -> torch.Tensor:
        return pick_tokens(logits, config, generator)

    def beam_group(self, pixel_values: torch.Tensor, prompts: list[str], config: GenerationConfig):
        """-> one list of token ids (no EOS) per image."""
        return [g.token_ids for g in generate(self.captioner, pixel_values, prompts, config)]

    def prefix_length(self, pixel_values: torch.Tensor) -> int:
        return int(self.captioner.image_prefix(pixel_values[None].to(self.captioner.device)).shape[1])

    def prompt_length(self, prompt: str) -> int:
        return int(encode_prompts(self.tokenizer, [prompt])[0].shape[1])

    def text(self, tokens: list[int]) -> str:
        return _text(self.tokenizer, tokens)

    def detached_text(self) -> Callable[[list[int]], str]:
        """`text` over a copy of the tokenizer, for another thread: a tokenizer is not
        promised to be safe to use from two threads at once."""
        import copy

        tokenizer = copy.deepcopy(self.tokenizer)
        return lambda tokens: _text(tokenizer, tokens)


def _text(tokenizer, tokens: list[int]) -> str:
    return tokenizer.decode(tokens, skip_special_tokens=True).strip()


def _context_length(lm) -> int | None:
    config = lm.config
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


# ---- the running batch's cache ------------------------------------------------------
def _layers(cache) -> list:
    return list(cache.layers)


def _merge_caches(batch_cache, new_cache, pad_batch: int, pad_new: int) -> None:
    """Append `new_cache`'s rows to `batch_cache`, left-padding whichever is shorter
    (`pad_batch` / `pad_new` zero columns in front; the mask hides them)."""
    for layer, extra in zip(_layers(batch_cache), _layers(new_cache)):
        keys, values = layer.keys, layer.values  # (B, H, T, D)
        new_keys, new_values = extra.keys, extra.values
        if pad_batch:
            keys, values = F.pad(keys, (0, 0, pad_batch, 0)), F.pad(values, (0, 0, pad_batch, 0))
        if pad_new:
            new_keys, new_values = F.pad(new_keys, (0, 0, pad_new, 0)), F.pad(new_values, (0, 0, pad_new, 0))
        layer.keys = torch.cat([keys, new_keys.to(keys.dtype)], dim=0)
        layer.values = torch.cat([values, new_values.to(values.dtype)], dim=0)


def _trim_left(cache, columns: int) -> None:
    for layer in _layers(cache):
        layer.keys = layer.keys[:, :, columns:]
        layer.values = layer.values[:, :, columns:]


@dataclass(eq=False)
class _Row:
    job: Job
    generator: torch.Generator | None


class ContinuousEngine:
    """Iteration-level batched decoding over one captioner (see the module docstring)."""

    def __init__(self, captioner, *, device: torch.device | None = None, precision: str = "fp32",
                 max_batch_size: int = 32, mode: str = "continuous", max_prefill_batch: int = 1,
                 max_waiting_steps: int = 0):
        if mode not in ENGINE_MODES:
            raise ValueError(f"mode must be one of {ENGINE_MODES}, not {mode!r}")
        if max_batch_size < 1 or max_prefill_batch < 1:
            raise ValueError("max_batch_size and max_prefill_batch must be at least 1")
        if max_waiting_steps < 0:
            raise ValueError("max_waiting_steps must be at least 0")
        self.decoder = _Decoder(captioner)
        self.device = device or captioner.device
        self.precision = precision
        self.max_batch_size = max_batch_size
        self.max_prefill_batch = max_prefill_batch
        self.mode = mode
        self.max_waiting_steps = max_waiting_steps
        self._deferred_steps = 0  # steps newcomers have waited for company so far
        self.context_length = _context_length(captioner.lm)
        self._lock = threading.Lock()
        self._waiting: collections.deque[Job] = collections.deque()
        # the running batch: one _Row per batch row, and the tensors of those rows
        self._rows: list[_Row] = []
        self._cache = None
        self._mask: torch.Tensor | None = None  # (R, T) 1 = a real position
        self._positions: torch.Tensor | None = None  # (R, 1) the next position of each row
        self._tokens: torch.Tensor | None = None  # (R,) the token each row feeds next
        self._prefix_positions: int | None = None
        self._stepping = False

    # ---- from any thread --------------------------------------------------------
    def submit(self, job: Job) -> None:
        job.config.validate()
        with self._lock:
            self._waiting.append(job)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._rows)

    def has_work(self) -> bool:
        # _stepping covers jobs taken from the queue but not yet rows (their prefill runs)
        return bool(self._waiting) or bool(self._rows) or self._stepping

    # ---- on the engine's thread ---------------------------------------------------
    @torch.no_grad()
    def step(self) -> None:
        """Admit newcomers, decode one beam group if one waits, then one token per running row."""
        from gitcli.dist import autocast

        self._stepping = True
        try:
            with autocast(self.precision, self.device):
                self._drop_cancelled()
                beam_jobs = self._admit()
                if beam_jobs:
                    self._run_beam_group(beam_jobs)
                if self._rows:
                    self._decode_one()
        finally:
            self._stepping = False

    def fail_all(self, exc: BaseException) -> None:
        """End every waiting and running job with `exc` (a fault outside any one job)."""
        with self._lock:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for job in [row.job for row in self._rows] + waiting:
            self._fail(job, exc)
        self._reset()

    def run_until_idle(self) -> None:
        while self.has_work():
            self.step()

    # ---- admission ----------------------------------------------------------------
    def _admit(self) -> list[Job]:
        """Prefill waiting jobs into free rows; -> one group of beam jobs to decode whole."""
        if self.mode == "whole" and self._rows:
            return []
        if self._waiting and not self._admission_due():
            self._deferred_steps += 1
            return []
        self._deferred_steps = 0
        beam_jobs: list[Job] = []
        beam_key = None
        newcomers: list[Job] = []
        skipped: list[Job] = []
        while True:
            with self._lock:
                taken = len(self._rows) + len(beam_jobs) + len(newcomers)
                if not self._waiting or taken >= self.max_batch_size:
                    break
                job = self._waiting.popleft()
            if job.cancelled:
                self._finish(job, "cancelled")
            elif job.config.beams > 1:
                key = _beam_key(job.config)
                if beam_key is None or key == beam_key:
                    beam_key = key
                    beam_jobs.append(job)
                else:
                    skipped.append(job)  # another group: a later step
            else:
                newcomers.append(job)
        if skipped:
            with self._lock:
                self._waiting.extendleft(reversed(skipped))
        for group in self._prefill_groups(newcomers):
            self._start(group)
        return beam_jobs

    def _admission_due(self) -> bool:
        """Whether waiting jobs join now or wait one more step for others to prefill with."""
        if not self._rows or self._deferred_steps >= self.max_waiting_steps:
            return True
        free = self.max_batch_size - len(self._rows)
        return len(self._waiting) >= min(free, self.max_prefill_batch)

    def _prefill_groups(self, jobs: list[Job]) -> list[list[Job]]:
        """Newcomers prefilled together: at most `max_prefill_batch`, all with prompts of
        one length (no padding inside a prefill). With 1, each is prefilled alone."""
        if self.max_prefill_batch == 1:
            return [[job] for job in jobs]
        by_length: dict[int, list[Job]] = {}
        for job in jobs:
            try:
                length = self.decoder.prompt_length(job.prompt)
            except Exception:
                length = -1 - len(by_length)  # its own group: it fails alone in its prefill
            by_length.setdefault(length, []).append(job)
        size = self.max_prefill_batch
        return [group[i:i + size] for group in by_length.values() for i in range(0, len(group), size)]

    def _start(self, jobs: list[Job]) -> None:
        """Prefill jobs (one, or several with prompts of one length), pick their first
        tokens, and merge the rows that go on into the running batch."""
        try:
            pixels = torch.stack([job.pixel_values for job in jobs])
            cache, mask, positions, logits = self.decoder.prefill(pixels, [job.prompt for job in jobs])
        except Exception as exc:
            if len(jobs) > 1:  # which job broke the group is unknown: each again alone
                for job in jobs:
                    self._start([job])
            else:  # this job fails alone; the batch is untouched
                self._fail(jobs[0], exc)
            return
        rows, kept, tokens = [], [], []
        for i, job in enumerate(jobs):
            job.prompt_tokens = int(mask.shape[1])
            try:
                limit = self.context_length
                if limit is not None and job.prompt_tokens + job.config.max_new_tokens > limit:
                    raise JobRejected(f"the image and prompt take {job.prompt_tokens} positions; with "
                                      f"{job.config.max_new_tokens} new tokens that is over the model's "
                                      f"{limit}")
                generator = None
                if job.config.sampling:
                    generator = torch.Generator(device=logits.device).manual_seed(job.config.seed)
                token = int(self.decoder.pick(logits[i:i + 1], job.config, generator)[0])
            except Exception as exc:
                self._fail(job, exc)
                continue
            row = _Row(job, generator)
            if not self._emit(row, token):  # a row that ended on its first token never joins
                rows.append(row)
                kept.append(i)
                tokens.append(token)
        if not rows:
            return
        if len(kept) < len(jobs):
            index = torch.tensor(kept, device=mask.device)
            cache.batch_select_indices(index)
            mask, positions = mask[index], positions[index]
        token_t = torch.tensor(tokens, device=positions.device)
        if not self._rows:
            self._cache, self._mask, self._positions, self._tokens = cache, mask, positions, token_t
        else:
            width, new_width = self._mask.shape[1], mask.shape[1]
            pad_batch, pad_new = max(0, new_width - width), max(0, width - new_width)
            _merge_caches(self._cache, cache, pad_batch, pad_new)
            self._mask = torch.cat([F.pad(self._mask, (pad_batch, 0)), F.pad(mask, (pad_new, 0))], dim=0)
            self._positions = torch.cat([self._positions, positions], dim=0)
            self._tokens = torch.cat([self._tokens, token_t], dim=0)
        self._rows.extend(rows)

    # ---- one step of the running batch ---------------------------------------------
    def _decode_one(self) -> None:
        self._mask = torch.cat([self._mask, self._mask.new_ones(self._mask.shape[0], 1)], dim=1)
        try:
            logits = self.decoder.step(self._cache, self._mask, self._positions, self._tokens)  # (R, V)
        except Exception as exc:  # a batched step cannot say which row broke it: all fail
            for row in self._rows:
                self._fail(row.job, exc)
            self._reset()
            return
        self._positions = self._positions + 1
        greedy = logits.argmax(dim=-1).tolist()  # one read-back for every greedy row
        keep, next_tokens = [], []
        for i, row in enumerate(self._rows):
            try:
                if row.job.config.sampling:
                    token = int(self.decoder.pick(logits[i:i + 1], row.job.config, row.generator)[0])
                else:
                    token = greedy[i]
            except Exception as exc:  # e.g. a row whose logits are not finite
                self._fail(row.job, exc)
                continue
            if not self._emit(row, token):
                keep.append(i)
                next_tokens.append(token)
        self._keep_rows(keep, next_tokens)

    def _drop_cancelled(self) -> None:
        if not any(row.job.cancelled for row in self._rows):
            return
        keep = []
        for i, row in enumerate(self._rows):
            if row.job.cancelled:
                self._finish(row.job, "cancelled")
            else:
                keep.append(i)
        self._keep_rows(keep, self._tokens[keep].tolist() if keep else [])

    def _keep_rows(self, keep: list[int], tokens: list[int]) -> None:
        """Only the rows `keep` stay (feeding `tokens` next); trim padding no row needs."""
        if not keep:
            self._reset()
            return
        if len(keep) < len(self._rows):
            index = torch.tensor(keep, device=self._mask.device)
            self._cache.batch_select_indices(index)
            self._mask, self._positions = self._mask[index], self._positions[index]
            self._rows = [self._rows[i] for i in keep]
            # columns that are padding in every remaining row are dropped from the left
            lead = int((self._mask.cumsum(dim=1) == 0).sum(dim=1).min())
            if lead:
                _trim_left(self._cache, lead)
                self._mask = self._mask[:, lead:]
        self._tokens = torch.tensor(tokens, device=self._mask.device)

    def _reset(self) -> None:
        self._rows, self._cache, self._mask, self._positions, self._tokens = [], None, None, None, None

    # ---- beam groups ----------------------------------------------------------------
    def _run_beam_group(self, jobs: list[Job]) -> None:
        try:
            pixels = torch.stack([job.pixel_values for job in jobs]).to(self.device)
            outputs = self.decoder.beam_group(pixels, [job.prompt for job in jobs], jobs[0].config)
            prefix_length = self._prefix_length(jobs[0].pixel_values)
        except Exception as exc:
            if len(jobs) == 1:
                self._fail(jobs[0], exc)
            else:  # which image broke the group is unknown: each decodes alone, so one fails alone
                for job in jobs:
                    self._run_beam_group([job])
            return
        for job, tokens in zip(jobs, outputs):
            job.prompt_tokens = prefix_length + self.decoder.prompt_length(job.prompt)
            job.tokens = list(tokens)
            if job.on_token is not None:
                for token in tokens:
                    job.on_token(job, token)
            self._finish(job, "length" if len(tokens) >= job.config.max_new_tokens else "stop")

    def _prefix_length(self, pixel_values: torch.Tensor) -> int:
        """Positions the image prefix takes (the same for every image of one model)."""
        if self._prefix_positions is None:
            self._prefix_positions = self.decoder.prefix_length(pixel_values)
        return self._prefix_positions

    # ---- endings ------------------------------------------------------------------
    def _emit(self, row: _Row, token: int) -> bool:
        """Record one token; -> True when the row has ended (and was finished)."""
        job = row.job
        if token == self.decoder.eos and not job.ignore_eos:
            self._finish(job, "stop")
            return True
        job.tokens.append(token)
        if job.on_token is not None:
            try:
                job.on_token(job, token)
            except Exception:  # a broken listener cancels its own job only
                job.cancel()
        if len(job.tokens) >= job.config.max_new_tokens:
            self._finish(job, "length")
            return True
        return False

    def _finish(self, job: Job, reason: str) -> None:
        job.finish_reason = reason
        if reason != "error":
            job.text = self.decoder.text(job.tokens)
        if job.on_finish is not None:
            try:
                job.on_finish(job)
            except Exception:
                pass  # the listener's failure is its own; the engine keeps going

    def _fail(self, job: Job, exc: BaseException) -> None:
        job.error = str(exc) or type(exc).__name__
        job.rejected = isinstance(exc, JobRejected)
        self._finish(job, "error")


def _beam_key(config: GenerationConfig) -> tuple:
    return (config.beams, config.max_new_tokens, config.length_penalty, config.cache, config.compile)
