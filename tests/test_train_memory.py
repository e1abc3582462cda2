"""--dry-run: counts from a meta-device model, and each part of the memory estimate checked
against numbers worked out by hand for the tiny preset."""

import pytest
from typer.testing import CliRunner

from gitcli.cli import app
from gitcli.config import TrainConfig
from gitcli.model.tiny import tiny_model_config
from gitcli.train.memory import build_meta_captioner, dry_run


def test_meta_model_counts_match_the_real_model(vocab, tiny_captioner):
    meta = build_meta_captioner(tiny_model_config())
    assert all(p.device.type == "meta" for p in meta.parameters())
    assert sum(p.numel() for p in meta.parameters()) == sum(p.numel() for p in tiny_captioner.parameters())


def test_estimate_parts_by_hand(tiny_captioner):
    # mapping only trains; tower and LM frozen in bf16; ZeRO-2 over 2 GPUs; batch 2; 8 text tokens
    cfg = TrainConfig(batch_size=2, zero=2, precision="bf16")
    est = dry_run(tiny_model_config(train_vision=False, train_lm=False), cfg, text_tokens=8, world=2)
    n_map = sum(p.numel() for p in tiny_captioner.mapping.parameters())
    n_vis = sum(p.numel() for p in tiny_captioner.vision.parameters())
    n_lm = sum(p.numel() for p in tiny_captioner.lm.parameters())
    vocab = tiny_captioner.lm.config.vocab_size
    assert n_map == 128 * 128 + 128 + 2 * 128  # linear 128->128 + LayerNorm
    assert (est.trainable, est.frozen) == (n_map, n_vis + n_lm)
    assert est.weights == 4 * n_map + 2 * (n_vis + n_lm)  # not split below ZeRO-3
    assert est.gradients == 4 * n_map // 2  # fp32, split by ZeRO-2
    assert est.optimizer == 2 * 4 * n_map // 2  # two AdamW moments, split
    # LM: 3 layers, D 128, F 512, 4 heads; T = 16 grid tokens + 8 text = 24; B = 2; bf16
    per_layer = 2 * 24 * (6 * 128 + 2 * 512) + 2 * 2 * 4 * 24 * 24
    logits = 2 * 9 * vocab * (2 + 4)  # text + 1 positions, bf16 logits and their fp32 copy
    assert est.activations == 3 * per_layer * 2 + logits
    assert est.total == est.weights + est.gradients + est.optimizer + est.activations


def test_stage3_offload_and_checkpointing_by_hand(tiny_captioner):
    cfg = TrainConfig(batch_size=2, zero=3, offload=True, precision="fp32", grad_checkpointing=True)
    est = dry_run(tiny_model_config(), cfg, text_tokens=8, world=4)  # everything trains (tiny default)
    n_all = sum(p.numel() for p in tiny_captioner.parameters())
    n_map = sum(p.numel() for p in tiny_captioner.mapping.parameters())
    assert est.trainable == n_all
    weights = 4 * (n_map + sum(p.numel() for p in tiny_captioner.vision.parameters())) + 2 * (n_all - n_map - sum(
        p.numel() for p in tiny_captioner.vision.parameters()))  # LM keeps its bf16 storage dtype
    assert est.weights == 0 and est.optimizer == 0  # both in host RAM
    assert est.host_offload == 2 * weights // 4 + weights // 4
    assert est.gradients == weights // 4
    lm_layer = 2 * 24 * (6 * 128 + 2 * 512) + 2 * 2 * 4 * 24 * 24
    vit_layer = 2 * 17 * (6 * 128 + 2 * 512) + 2 * 2 * 4 * 17 * 17  # 16 patches + class token, 4 heads
    checkpointed = (3 * 2 * 24 * 128 + lm_layer) + (3 * 2 * 17 * 128 + vit_layer)
    assert est.activations == 4 * checkpointed + 2 * 9 * tiny_captioner.lm.config.vocab_size * (4 + 4)


@pytest.mark.parametrize("quant", ["bnb-int8", "int8-weight", "int8-dynamic", "fp8"])
def test_quantised_lm_weights_count_one_byte_and_a_scale_per_row(tmp_path, quant):
    # an LM from config only (a local directory with config.json): no weights anywhere
    from transformers import OPTConfig

    OPTConfig(hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4, word_embed_proj_dim=64,
              vocab_size=100, max_position_embeddings=64).save_pretrained(tmp_path / "lm")
    model = tiny_model_config(lm=str(tmp_path / "lm"), preset=None, quant=quant, lora_rank=0, train_lm=False,
                              train_vision=False)
    est8 = dry_run(model, TrainConfig(batch_size=1), text_tokens=4, world=1)
    model.quant = "none"
    est16 = dry_run(model, TrainConfig(batch_size=1), text_tokens=4, world=1)
    linears = 2 * (4 * 64 * 64 + 64 * 128 + 128 * 64)  # q, k, v, out, fc1, fc2 weights per layer
    rows = 2 * (4 * 64 + 128 + 64)  # their output rows, one fp32 scale each
    assert est16.weights - est8.weights == linears - 4 * rows  # 2 bytes -> 1 byte each, plus the scales


def test_cli_dry_run_prints_and_exits(tmp_path):
    runner = CliRunner()
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--preset", "tiny", "--zero", "2", "--dry-run", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "trainable parameters" in result.output and "peak per GPU" in result.output
    assert not out.exists()  # nothing trained, nothing written


def test_cli_dry_run_without_config_says_so_in_one_line():
    result = CliRunner().invoke(app, ["train", "--lm", "nobody/no-such-model", "--dry-run"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "needs the config of 'nobody/no-such-model'" in errors[0]


def test_decoding_estimate_counts_weights_as_stored_the_cache_and_the_logits():
    import torch

    from gitcli.model.captioner import build_captioner
    from gitcli.model.quant import quantised_linears
    from gitcli.train.memory import decoding_estimate

    built = {}
    for quant in ("none", "int8-weight"):
        torch.manual_seed(0)
        built[quant] = build_captioner(tiny_model_config(quant=quant, train_lm=False, dtype="fp32"))
    dense = built["none"]
    text = dense.lm.config
    params = sum(p.numel() * 4 for p in dense.parameters())
    cache = 2 * text.num_hidden_layers * 6 * 10 * text.hidden_size * 2  # bf16 keys and values
    logits = 6 * text.vocab_size * 4
    assert decoding_estimate(dense, rows=6, tokens=10, precision="bf16") == params + cache + logits
    saved = sum(3 * m.weight.numel() - 4 * m.weight.shape[0] for m in quantised_linears(dense.lm))  # fp32 -> int8
    assert saved > 0
    assert (decoding_estimate(dense, rows=6, tokens=10, precision="bf16")
            - decoding_estimate(built["int8-weight"], rows=6, tokens=10, precision="bf16")) == saved
