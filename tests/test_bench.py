"""`gitcap bench train|generate` on CPU: tiny sizes, real architecture names, the FLOPs formulas."""

import json
import math

import pytest
from typer.testing import CliRunner

from gitcli.cli import app

runner = CliRunner()
FAST = ["--device", "cpu", "--steps", "2", "--warmup", "1", "--batch-size", "2"]
TINY_VISION = ["--vision", "gitcap-tiny-vit"]  # a real open_clip ViT config, small enough for a test


def _bench(tmp_path, *args):
    out = tmp_path / "bench.json"
    result = runner.invoke(app, ["bench", *args, *FAST, "--json", str(out)], terminal_width=200)
    assert result.exit_code == 0, result.output
    return json.loads(out.read_text()), result.output


def _check_numbers(report, tokens):
    r = report["result"]
    for key in ("items_per_s", "tokens_per_s", "median_batch_seconds", "flops_per_item", "achieved_tflops"):
        assert math.isfinite(r[key]) and r[key] > 0, key
    assert len(r["batch_seconds"]) == 2 and all(t > 0 for t in r["batch_seconds"])
    # tokens/s is images (samples)/s times the fixed tokens per item
    assert r["tokens_per_item"] == tokens
    assert r["tokens_per_s"] == pytest.approx(r["items_per_s"] * tokens, rel=1e-9)
    assert r["items_per_s"] == pytest.approx(r["batch_size"] / r["median_batch_seconds"], rel=1e-9)
    assert r["mfu"] is None and r["peak_tflops"] is None  # a CPU has no known peak
    env = report["environment"]
    assert env["device_type"] == "cpu" and env["torch"] and env["transformers"] and env["date"]


@pytest.mark.slow
def test_train_tiny_preset(tmp_path):
    report, output = _bench(tmp_path, "train", "--preset", "tiny", "--caption-tokens", "6")
    assert report["command"] == "bench train"
    assert report["options"]["batch_size"] == 2 and report["options"]["caption_tokens"] == 6
    assert report["options"]["model"]["preset"] == "tiny"
    _check_numbers(report, 6)
    r = report["result"]
    assert r["kind"] == "train" and r["unit"] == "samples" and math.isfinite(r["last_loss"])
    assert r["memory_estimate_bytes"] > 0 and r["trainable_parameters"] > 0
    assert "samples/s" in output and "MFU" in output and "--dry-run estimate" in output


@pytest.mark.slow
def test_generate_named_architecture_shrunk(tmp_path):
    report, output = _bench(tmp_path, "generate", *TINY_VISION, "--lm", "opt-2.7b", "--lm-layers", "1",
                            "--prefix-length", "3", "--beams", "2", "--max-new-tokens", "4")
    _check_numbers(report, 4)
    r = report["result"]
    assert r["kind"] == "generate" and r["prefix_length"] == 3
    assert report["options"]["lm_layers"] == 1 and report["options"]["model"]["lm"] == "facebook/opt-2.7b"
    # OPT-2.7B's width and vocabulary are kept: the head is 50272 x 2560
    assert r["flops_parts"]["lm_head_parameters"] == 50272 * 2560
    assert "images/s" in output


def _tiny_llama_dir(tmp_path):
    from transformers import LlamaConfig

    path = tmp_path / "tiny-llama"
    LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, vocab_size=100,
                max_position_embeddings=64, tie_word_embeddings=False).save_pretrained(path)
    return path


def test_train_from_config_dir_matches_hand_count(tmp_path):
    lm_dir = _tiny_llama_dir(tmp_path)
    prefix, tokens = 4, 5
    report, _ = _bench(tmp_path, "train", *TINY_VISION, "--lm", str(lm_dir), "--train-vision",
                       "--mapping", "mlp", "--prefix-length", str(prefix), "--caption-tokens", str(tokens))
    _check_numbers(report, tokens)
    r = report["result"]
    parts = r["flops_parts"]
    # LLaMA layer by hand: q, k, v, o (no biases) + gate, up, down + 2 RMSNorms; final norm; head 100 x 32
    body = 4 * 32 * 32 + 3 * 32 * 64 + 2 * 32 + 32
    assert parts["lm_body_parameters"] == body
    assert parts["lm_head_parameters"] == 100 * 32
    # MLP mapping: 64-d CLIP embedding -> 32*4/2 hidden -> 4 prefix tokens of 32
    assert parts["mapping_forward"] == 2 * 64 * 64 + 2 * 64 * 128
    lm_forward = 2 * body * (prefix + tokens) + 2 * 100 * 32 * (tokens + 1)
    # trained tower and mapping: 3x forward; frozen LM the gradient flows through: 2x forward
    expected = 3 * parts["vision_forward"] + 3 * parts["mapping_forward"] + 2 * lm_forward
    assert r["flops_per_item"] == pytest.approx(expected, rel=1e-12)
    assert parts["vision_forward"] > 0


def test_generate_flops_formula():
    from gitcli.bench.flops import LMParams, generate_flops_per_image, train_flops_per_sample

    lm = LMParams(body=10, head=3)
    # prefill: 2*10*2 positions + 2*3 for one logit row; then 3 steps x 3 beams x (2*10 + 2*3)
    assert generate_flops_per_image(vision=100, mapping=7, lm=lm, prefix=2, new_tokens=4, beams=3) == \
        100 + 7 + (40 + 6) + 3 * 3 * 26
    # fully tuned LM: 3x its forward of 2*10*(2+4) + 2*3*(4+1); frozen tower: 1x
    assert train_flops_per_sample(vision=100, mapping=7, lm=lm, prefix=2, caption_tokens=4,
                                  train_vision=False, train_lm=True) == 100 + 21 + 3 * (120 + 30)


def test_lm_params_ignore_lookups_and_count_tied_head_once():
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    from gitcli.bench.flops import lm_params

    lm = OPTForCausalLM(OPTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, ffn_dim=16,
                                  vocab_size=10, max_position_embeddings=16, word_embed_proj_dim=8))
    params = lm_params(lm)
    # q, k, v, out with biases; fc1, fc2 with biases; two LayerNorms per layer and a final one
    assert params.body == 4 * (8 * 8 + 8) + (8 * 16 + 16) + (16 * 8 + 8) + 3 * 2 * 8
    assert params.head == 10 * 8  # tied to the token embedding: a matmul, not a lookup, at the head
    assert lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
    assert isinstance(lm.get_output_embeddings(), torch.nn.Linear)


def test_peak_table():
    from gitcli.bench.flops import peak_flops

    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("Tesla T4") is None


@pytest.mark.parametrize("args,message", [
    (["train", *TINY_VISION, "--lm", "no-such-lm"], "unknown LM architecture"),
    (["generate", "--preset", "tiny", "--lm-layers", "2"], "--lm-layers"),
])
def test_user_mistakes_are_one_error_line(args, message):
    result = runner.invoke(app, ["bench", *args, "--device", "cpu"], terminal_width=200)
    assert result.exit_code != 0 and "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.output


@pytest.mark.slow
def test_train_from_cached_features_skips_the_tower(tmp_path):
    """--cached-features: the step starts from features, so no tower FLOPs and no tower weights
    in the estimate; the rest of the workload is the live run's."""
    model = [*TINY_VISION, "--lm", "gpt2", "--lm-layers", "1", "--prefix-length", "2", "--caption-tokens", "4"]
    live, _ = _bench(tmp_path, "train", *model)
    cached, _ = _bench(tmp_path, "train", *model, "--cached-features")
    assert cached["options"]["cached_features"] is True
    lr, cr = live["result"], cached["result"]
    assert lr["flops_parts"]["vision_forward"] > 0 and cr["flops_parts"]["vision_forward"] == 0
    assert cr["flops_per_item"] == pytest.approx(lr["flops_per_item"] - lr["flops_parts"]["vision_forward"], rel=1e-9)
    from gitcli.model.vision import create_clip_visual

    tower_bytes = sum(p.numel() * 4 for p in create_clip_visual("gitcap-tiny-vit", None).parameters())  # fp32 on CPU
    assert lr["memory_estimate_bytes"] - cr["memory_estimate_bytes"] == tower_bytes
    assert math.isfinite(cr["last_loss"])


def test_cached_features_with_a_trained_tower_is_refused():
    result = runner.invoke(app, ["bench", "train", "--preset", "tiny", "--cached-features", *FAST])
    assert result.exit_code != 0
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: --cached-features needs a frozen vision tower")


@pytest.mark.parametrize("decoding", [["--cache", "static"], ["--decoder", "transformers"]])
def test_generate_static_cache_and_transformers_reference(tmp_path, decoding):
    report, output = _bench(tmp_path, "generate", "--preset", "tiny", "--beams", "2", "--max-new-tokens", "3",
                            *decoding)
    _check_numbers(report, 3)
    options = report["options"]
    assert (options["cache"], options["decoder"]) == (("static", "gitcap") if "--cache" in decoding
                                                      else ("dynamic", "transformers"))
    assert ("static cache" in output) == ("--cache" in decoding)


def test_generate_decoding_options_are_checked(tmp_path):
    for args, message in ((["--compile"], "--compile needs --cache static"),
                          (["--decoder", "hf"], "--decoder must be gitcap or transformers"),
                          (["--decoder", "transformers", "--cache", "static"], "--decoder transformers")):
        result = runner.invoke(app, ["bench", "generate", "--preset", "tiny", *FAST, *args], terminal_width=200)
        assert result.exit_code != 0 and "Traceback" not in result.output
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and message in errors[0], result.output


@pytest.mark.parametrize("kind", ["train", "generate"])
def test_profile_shows_where_an_iteration_goes(tmp_path, kind):
    extra = ["--max-new-tokens", "3", "--beams", "2"] if kind == "generate" else ["--caption-tokens", "4"]
    report, output = _bench(tmp_path, kind, "--preset", "tiny", *extra, "--profile")
    prof = report["result"]["profile"]
    assert prof["wall_ms"] > 0 and prof["busy_ms"] > 0
    ops = prof["operators"]
    assert 0 < len(ops) <= 20 and any(op["name"].startswith("aten::") for op in ops)
    costs = [op["self_cpu_ms"] for op in ops]  # a CPU run ranks by CPU time
    assert costs == sorted(costs, reverse=True) and costs[0] > 0
    assert all(op["calls_per_iteration"] > 0 for op in ops)
    assert "where an iteration's time goes" in output and ops[0]["name"][:30] in output
    # without --profile nothing is profiled
    plain, _ = _bench(tmp_path, kind, "--preset", "tiny", *extra)
    assert plain["result"]["profile"] is None
