"""The continuous-batching engine answers what `gitcap caption` / `ask` answer for each
image alone, while requests join and leave a running batch."""

from __future__ import annotations

import pytest
import torch

from gitcli.config import GenerationConfig
from gitcli.generate.continuous import ContinuousEngine, Job

QUESTIONS = [None, "what color is the circle?", None, "how many shapes are there?", None, "where is the square?"]
MAX_NEW = [20, 7, 3, 12, 20, 1]


@pytest.fixture(scope="module")
def image_files(scene_images, tmp_path_factory):
    folder = tmp_path_factory.mktemp("scenes")
    paths = []
    for i, image in enumerate(scene_images):
        path = folder / f"scene{i}.png"
        image.save(path)
        paths.append(path)
    return paths


def alone(captioner, path, question, config):
    """What `gitcap caption` / `ask` decode for this one image."""
    from gitcli.infer import run_on_images

    [result] = run_on_images(captioner, "fp32", [path], [question], config, batch_size=1)
    return result.generation


def job_for(captioner, path, question, config, **callbacks):
    from gitcli.data.images import open_rgb
    from gitcli.data.text import prompt_text

    pixels = captioner.image_transform()(open_rgb(path))
    return Job(pixels, prompt_text(captioner.config, question), config, **callbacks)


def staggered(engine, jobs, arrivals):
    """Submit job i before step `arrivals[i]`, stepping while others decode."""
    step = 0
    pending = sorted(zip(arrivals, range(len(jobs))))
    widths = []
    while pending or engine.has_work():
        while pending and pending[0][0] <= step:
            engine.submit(jobs[pending.pop(0)[1]])
        engine.step()
        widths.append(engine.running)
        step += 1
        check_batch_state(engine)
    return widths


def check_batch_state(engine):
    """Every row keeps all its real positions (its prefix, prompt and fed tokens) and no
    column is padding in every row."""
    if not engine.running:
        return
    mask = engine._mask
    assert bool(mask[:, 0].any())
    real = mask.sum(dim=1).tolist()
    assert real == [row.job.prompt_tokens + len(row.job.tokens) - 1 for row in engine._rows]
    assert engine._cache.layers[0].keys.shape[2] == mask.shape[1]


@pytest.mark.parametrize("prefill_batch", [1, 4])
def test_greedy_joining_a_running_batch_is_token_for_token_what_each_image_gives_alone(tiny_captioner, image_files,
                                                                                      prefill_batch):
    configs = [GenerationConfig(max_new_tokens=n) for n in MAX_NEW]
    expected = [alone(tiny_captioner, p, q, c) for p, q, c in zip(image_files, QUESTIONS, configs)]
    assert len({len(e.token_ids) for e in expected}) > 2  # rows of different lengths leave at different steps

    engine = ContinuousEngine(tiny_captioner, max_batch_size=8, max_prefill_batch=prefill_batch)
    jobs = [job_for(tiny_captioner, p, q, c) for p, q, c in zip(image_files, QUESTIONS, configs)]
    widths = staggered(engine, jobs, arrivals=[0, 1, 1, 1, 4, 4])

    assert max(widths) >= 3  # newcomers really joined rows that were mid-decode
    for job, want in zip(jobs, expected):
        assert job.finish_reason in ("stop", "length"), job.error
        assert job.tokens == want.token_ids
        assert job.text == want.text
        assert job.finish_reason == ("length" if len(want.token_ids) == job.config.max_new_tokens else "stop")
        assert job.prompt_tokens > 0


@pytest.mark.parametrize("prefill_batch", [1, 4])
def test_sampling_per_request_seed_matches_the_cli_alone(tiny_captioner, image_files, prefill_batch):
    configs = [GenerationConfig(max_new_tokens=15, temperature=t, top_p=p, seed=s)
               for t, p, s in [(1.0, 1.0, 1), (0.7, 0.9, 2), (1.3, 0.5, 3), (0.0, 1.0, 0)]]
    paths, questions = image_files[:4], QUESTIONS[:4]
    expected = [alone(tiny_captioner, p, q, c) for p, q, c in zip(paths, questions, configs)]
    engine = ContinuousEngine(tiny_captioner, max_prefill_batch=prefill_batch)
    jobs = [job_for(tiny_captioner, p, q, c) for p, q, c in zip(paths, questions, configs)]
    staggered(engine, jobs, arrivals=[0, 2, 2, 2])
    assert [j.tokens for j in jobs] == [e.token_ids for e in expected]


def test_beam_requests_are_decoded_as_a_group_between_steps(tiny_captioner, image_files):
    beam = GenerationConfig(max_new_tokens=10, beams=3)
    greedy = GenerationConfig(max_new_tokens=20)
    specs = [(image_files[0], None, greedy), (image_files[1], None, beam), (image_files[2], "what color is the circle?", beam),
             (image_files[3], None, greedy)]
    expected = [alone(tiny_captioner, p, q, c) for p, q, c in specs]
    engine = ContinuousEngine(tiny_captioner)
    jobs = [job_for(tiny_captioner, p, q, c) for p, q, c in specs]
    staggered(engine, jobs, arrivals=[0, 1, 1, 2])
    assert [j.tokens for j in jobs] == [e.token_ids for e in expected]


@pytest.mark.parametrize("prefill_batch", [1, 4])
def test_cancelled_and_failing_jobs_leave_alone_and_the_others_complete(tiny_captioner, image_files, prefill_batch):
    config = GenerationConfig(max_new_tokens=20)
    expected = [alone(tiny_captioner, p, None, config) for p in image_files[:3]]
    engine = ContinuousEngine(tiny_captioner, max_prefill_batch=prefill_batch)
    good = [job_for(tiny_captioner, p, None, config) for p in image_files[:3]]
    broken = Job(torch.zeros(3, 5, 5), "", config)  # not the tower's input size: its prefill fails
    finished = []
    cancelled = job_for(tiny_captioner, image_files[3], None, GenerationConfig(max_new_tokens=200),
                        on_finish=finished.append)
    engine.submit(good[0])
    engine.submit(cancelled)
    engine.step()
    engine.submit(broken)
    engine.submit(good[1])
    engine.step()
    running = engine.running
    cancelled.cancel()
    engine.step()
    assert engine.running < running + 1  # the cancelled row left at the next step
    engine.submit(good[2])
    engine.run_until_idle()
    assert broken.finish_reason == "error" and broken.error
    assert finished == [cancelled] and cancelled.finish_reason == "cancelled"
    assert [j.tokens for j in good] == [e.token_ids for e in expected]


def test_whole_mode_admits_only_into_an_empty_batch(tiny_captioner, image_files):
    config = GenerationConfig(max_new_tokens=20)
    engine = ContinuousEngine(tiny_captioner, mode="whole")
    first = job_for(tiny_captioner, image_files[0], None, config)
    late = job_for(tiny_captioner, image_files[1], None, config)
    engine.submit(first)
    engine.step()
    engine.submit(late)
    while not first.done:
        assert late.tokens == []  # waits for the running batch to finish
        engine.step()
    engine.run_until_idle()
    assert late.tokens == alone(tiny_captioner, image_files[1], None, config).token_ids


def test_too_long_for_the_model_is_rejected_alone(tiny_captioner, image_files):
    engine = ContinuousEngine(tiny_captioner)
    job = job_for(tiny_captioner, image_files[0], None, GenerationConfig(max_new_tokens=100_000))
    engine.submit(job)
    engine.run_until_idle()
    assert job.finish_reason == "error" and job.rejected and "positions" in job.error


def test_newcomers_to_a_busy_batch_wait_for_company_but_an_idle_engine_admits_at_once(tiny_captioner, image_files):
    config = GenerationConfig(max_new_tokens=20)
    engine = ContinuousEngine(tiny_captioner, max_batch_size=8, max_prefill_batch=3, max_waiting_steps=2)
    jobs = [job_for(tiny_captioner, p, None, config) for p in image_files]
    engine.submit(jobs[0])
    engine.step()
    assert engine.running == 1  # a quiet engine never makes a request wait
    engine.submit(jobs[1])
    engine.step()
    engine.step()
    assert engine.running == 1 and engine.waiting == 1  # alone, it waits two steps for others
    engine.step()
    assert engine.running == 2 and engine.waiting == 0  # then joins
    for job in jobs[2:5]:
        engine.submit(job)
    engine.step()
    assert engine.running == 5  # three fill a prefill group: they join at once
    engine.run_until_idle()
    for job, path in zip(jobs[:5], image_files):
        assert job.tokens == alone(tiny_captioner, path, None, config).token_ids


def test_newcomers_fill_the_last_free_rows_without_waiting(tiny_captioner, image_files):
    config = GenerationConfig(max_new_tokens=20)
    engine = ContinuousEngine(tiny_captioner, max_batch_size=3, max_prefill_batch=8, max_waiting_steps=50)
    jobs = [job_for(tiny_captioner, p, None, config) for p in image_files[:3]]
    engine.submit(jobs[0])
    engine.step()
    engine.submit(jobs[1])
    engine.submit(jobs[2])
    engine.step()
    assert engine.running == 3  # two waiting fill the two free rows: no reason to wait


def test_a_waiting_engine_keeps_greedy_answers_token_for_token(tiny_captioner, image_files):
    configs = [GenerationConfig(max_new_tokens=n) for n in MAX_NEW]
    expected = [alone(tiny_captioner, p, q, c) for p, q, c in zip(image_files, QUESTIONS, configs)]
    engine = ContinuousEngine(tiny_captioner, max_batch_size=8, max_prefill_batch=4, max_waiting_steps=3)
    jobs = [job_for(tiny_captioner, p, q, c) for p, q, c in zip(image_files, QUESTIONS, configs)]
    staggered(engine, jobs, arrivals=[0, 1, 2, 2, 5, 9])
    assert [j.tokens for j in jobs] == [e.token_ids for e in expected]


def test_ignore_eos_decodes_past_the_end_exactly_as_the_batch_decoder_without_eos(tiny_captioner, image_files):
    """A row with ignore_eos runs to max_new_tokens, EOS included as a token, and each token
    is what the batch decoder gives with no EOS (`decode_tokens(eos=None)`, the fixed
    workload of `gitcap bench`), while rows that stop at EOS decode beside it. The untrained
    model rarely says its EOS, so a token it does say early plays EOS here."""
    from gitcli.generate.decode import decode_tokens
    from gitcli.generate.inputs import prepare_inputs

    config = GenerationConfig(max_new_tokens=12)

    def decoded(i, eos):
        job = job_for(tiny_captioner, image_files[i], QUESTIONS[i], config)
        with torch.no_grad():
            prefix = tiny_captioner.image_prefix(job.pixel_values[None])
            embeds, mask, positions = prepare_inputs(tiny_captioner, prefix, [job.prompt])
            [(tokens, _)] = decode_tokens(tiny_captioner.lm, embeds, mask, positions, config, eos)
        return list(tokens)

    endless = [decoded(i, None) for i in range(len(image_files))]
    assert all(len(t) == config.max_new_tokens for t in endless)
    eos = endless[0][3]  # the token the first image says fourth ends answers in this test
    stopping = [decoded(i, eos) for i in range(len(image_files))]
    ended_early = [i for i, t in enumerate(stopping) if len(t) < config.max_new_tokens]
    assert 0 in ended_early

    engine = ContinuousEngine(tiny_captioner, max_batch_size=8)
    engine.decoder.eos = eos
    normal = [job_for(tiny_captioner, p, q, config) for p, q in zip(image_files, QUESTIONS)]
    ignoring = [job_for(tiny_captioner, image_files[i], QUESTIONS[i], config, ignore_eos=True) for i in ended_early]
    staggered(engine, normal + ignoring, arrivals=[0, 1, 1, 3, 4, 6] + list(range(len(ignoring))))
    assert [j.tokens for j in normal] == stopping
    for i, job in zip(ended_early, ignoring):
        assert job.tokens == endless[i] and job.finish_reason == "length"
        assert job.tokens[len(stopping[i])] == eos  # it went on where the answer ended
