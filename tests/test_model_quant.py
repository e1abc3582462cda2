"""--quant: every format that runs on a CPU loads a tiny LM, stays close to the fp32 model,
lets the mapping (and LoRA) learn through the frozen quantised LM, saves and loads exactly;
what cannot run is refused in one line before anything loads.

Tolerance, on the tiny preset's LM (fp32 reference, same weights): the logits' relative L2
error under 5% and the mapping's gradient within 10% of the reference's. Measured: about
1.7% / 2.8% for int8-weight and 2.1% / 3.7% for int8-dynamic.
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from gitcli.cli import app
from gitcli.config import ModelConfig
from gitcli.errors import GitcapError
from gitcli.model.captioner import build_captioner
from gitcli.model.checkpoint import load_checkpoint, read_checkpoint_config, save_checkpoint
from gitcli.model.quant import StraightThroughLinear, check_quant_device, quantise_lm, quantised_linears
from gitcli.model.tiny import tiny_model_config
from tests.support.training import FALL, fixed_batch, loss_falls

TORCHAO_CPU = ["int8-weight", "int8-dynamic"]
LOGIT_TOLERANCE = 0.05
GRADIENT_TOLERANCE = 0.10


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _frozen_tiny(quant: str, **overrides):
    torch.manual_seed(0)
    config = tiny_model_config(quant=quant, train_lm=False, train_vision=False, dtype="fp32", **overrides)
    return build_captioner(config)


def _logits_and_mapping_grad(model):
    batch = fixed_batch(model, "captions")
    model.eval()
    _, logits = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], batch["labels"])
    logits.sum().backward()
    grad = torch.cat([p.grad.flatten() for p in model.mapping.parameters()])
    return logits.detach(), grad


@pytest.fixture(scope="module")
def reference():
    return _logits_and_mapping_grad(_frozen_tiny("none"))


@pytest.mark.parametrize("quant", TORCHAO_CPU)
def test_torchao_format_stays_close_and_passes_the_gradient(quant, reference):
    model = _frozen_tiny(quant)
    linears = quantised_linears(model.lm)
    assert linears and all(type(m.weight).__module__.startswith("torchao.") for m in linears)
    assert type(model.lm.get_output_embeddings().weight) is torch.nn.Parameter  # the head stays dense
    logits, grad = _logits_and_mapping_grad(model)
    ref_logits, ref_grad = reference
    assert not torch.equal(logits, ref_logits)  # really quantised
    assert _relative(logits, ref_logits) < LOGIT_TOLERANCE
    assert grad.abs().sum() > 0 and _relative(grad, ref_grad) < GRADIENT_TOLERANCE


def test_bnb_int8_stays_close(tiny_checkpoint):
    import bitsandbytes as bnb

    quantised = load_checkpoint(tiny_checkpoint, quant="bnb-int8").eval()
    dense = load_checkpoint(tiny_checkpoint).eval()
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in quantised.lm.modules())
    batch = fixed_batch(dense, "captions")
    with torch.no_grad():
        logits = quantised(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])[1]
        ref = dense(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])[1]
    assert not torch.equal(logits, ref) and _relative(logits, ref) < LOGIT_TOLERANCE


def test_activation_quantised_layer_backpropagates_through_its_dequantised_weight():
    class OneLayer(torch.nn.Module):  # an "LM" of one linear layer and no output head
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(32, 16)

        def get_output_embeddings(self):
            return None

    torch.manual_seed(0)
    linear = quantise_lm(OneLayer(), "int8-dynamic").linear
    assert isinstance(linear, StraightThroughLinear) and isinstance(linear, torch.nn.Linear)
    x = torch.randn(4, 32, requires_grad=True)
    grad_out = torch.randn(4, 16)
    linear(x).backward(grad_out)
    assert torch.allclose(x.grad, grad_out @ linear.weight.dequantize(), atol=1e-6)
    with torch.no_grad():  # no gradient asked: the plain quantised forward, same values
        assert torch.equal(linear(x), torch.nn.functional.linear(x, linear.weight, linear.bias))


@pytest.mark.parametrize("quant", TORCHAO_CPU)
def test_mapping_learns_through_a_quantised_frozen_lm(quant):
    model = _frozen_tiny(quant)
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == {"mapping"}
    losses = loss_falls(model, "captions")
    assert losses[-1] < FALL * losses[0]


@pytest.mark.parametrize("quant", TORCHAO_CPU)
def test_lora_learns_on_a_quantised_lm(quant):
    model = _frozen_tiny(quant, lora_rank=8)
    names = [n for n, p in model.lm.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    before = [p.detach().clone() for n, p in model.lm.named_parameters() if "lora_B" in n]
    losses = loss_falls(model, "captions")
    assert losses[-1] < FALL * losses[0]
    after = [p for n, p in model.lm.named_parameters() if "lora_B" in n]
    assert any(not torch.equal(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize("quant", TORCHAO_CPU)
def test_checkpoint_of_a_quantised_tiny_lm_loads_exactly(tmp_path, quant):
    model = _frozen_tiny(quant).eval()
    ckpt = save_checkpoint(model, tmp_path / "ckpt")
    assert read_checkpoint_config(ckpt)[1].quant == quant
    loaded = load_checkpoint(ckpt).eval()
    for a, b in zip(quantised_linears(model.lm), quantised_linears(loaded.lm)):
        assert torch.equal(a.weight.qdata, b.weight.qdata) and torch.equal(a.weight.scale, b.weight.scale)
    batch = fixed_batch(model, "captions")
    with torch.no_grad():
        assert torch.equal(model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])[1],
                           loaded(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])[1])
    # and a dense checkpoint can be served quantised, and back
    assert load_checkpoint(ckpt, quant="none").config.quant == "none"


def test_fp8_is_refused_below_compute_capability_8_9():
    with pytest.raises(GitcapError, match=r"--quant fp8 needs a GPU of compute capability 8\.9.*this is cpu"):
        check_quant_device("fp8", torch.device("cpu"))


def test_missing_torchao_is_one_line(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torchao.quantization", None)  # import fails as if not installed
    with pytest.raises(GitcapError, match=r"--quant int8-weight needs torchao"):
        check_quant_device("int8-weight", torch.device("cpu"))


@pytest.mark.parametrize("config", [
    dict(quant="int8-weight", train_lm=True),
    dict(quant="bnb-int8", train_lm=True),
])
def test_a_quantised_lm_is_not_fully_tuned(config):
    with pytest.raises(GitcapError, match="cannot be fully tuned; use --lora"):
        ModelConfig(**config).validate_for_training()


def test_older_checkpoints_say_int8(tmp_path, tiny_checkpoint):
    import shutil

    for saved, expected in ((True, "bnb-int8"), (False, "none")):
        ckpt = tmp_path / f"old-{saved}"
        shutil.copytree(tiny_checkpoint, ckpt)
        meta = json.loads((ckpt / "gitcap.json").read_text())
        meta["model"].pop("quant")
        meta["model"]["int8"] = saved
        (ckpt / "gitcap.json").write_text(json.dumps(meta))
        assert read_checkpoint_config(ckpt)[1].quant == expected
    meta["model"]["int8"] = "yes"
    (ckpt / "gitcap.json").write_text(json.dumps(meta))
    with pytest.raises(GitcapError, match="field 'int8' must be bool"):
        read_checkpoint_config(ckpt)


def _one_error_line(args: list[str]) -> str:
    result = CliRunner().invoke(app, args)
    assert result.exit_code not in (0, None) and not isinstance(result.exception, GitcapError), result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


@pytest.fixture(scope="module")
def image(tmp_path_factory, scene_images):
    path = tmp_path_factory.mktemp("quant") / "scene.png"
    scene_images[0].save(path)
    return str(path)


@pytest.mark.parametrize("args,message", [
    (["caption", "--preset", "tiny", "--quant", "fp8", "IMAGE"], "--quant fp8 needs a GPU of compute capability 8.9"),
    (["caption", "--preset", "tiny", "--quant", "int4", "IMAGE"], "unknown --quant 'int4'"),
    (["train", "--data", "synthetic", "--preset", "tiny", "--int8", "--quant", "int8-weight"],
     "--int8 means --quant bnb-int8"),
    (["train", "--data", "synthetic", "--preset", "tiny", "--quant", "fp8", "--device", "cpu"],
     "--quant fp8 needs a GPU"),
    (["train", "--data", "synthetic", "--preset", "tiny", "--quant", "int8-weight", "--zero", "2"],
     "DeepSpeed swaps every weight"),
    (["train", "--data", "synthetic", "--lm", "gpt2", "--quant", "int8-dynamic", "--train-lm"],
     "cannot be fully tuned; use --lora R"),
    (["bench", "generate", "--preset", "tiny", "--quant", "fp8", "--device", "cpu"], "--quant fp8 needs a GPU"),
])
def test_refusals_are_one_line(tmp_path, image, args, message):
    args = [image if a == "IMAGE" else a for a in args]
    if args[0] == "train":
        args += ["--output-dir", str(tmp_path / "run")]
    assert message in _one_error_line(args)
    assert not (tmp_path / "run").exists()


def test_train_then_caption_quantised_from_the_command_line(tmp_path, image):
    run = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--data", "synthetic", "--synthetic-size", "8", "--preset", "tiny",
                                      "--quant", "int8-weight", "--max-steps", "2", "--batch-size", "4",
                                      "--num-workers", "0", "--device", "cpu", "--output-dir", str(run)])
    assert result.exit_code == 0, result.output
    assert read_checkpoint_config(run)[1].quant == "int8-weight"
    result = CliRunner().invoke(app, ["caption", "--checkpoint", str(run), image, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.splitlines()[-1])["caption"] is not None


@pytest.mark.gpu
@pytest.mark.parametrize("quant", ["int8-weight", "int8-dynamic", "fp8", "bnb-int8"])
def test_every_format_on_a_gpu_stays_close_and_passes_the_gradient(tmp_path, quant):
    """The same checks on CUDA, where fp8 runs (compute capability 8.9+) and each format
    takes its fast kernels; bf16 weights and autocast, as training runs there."""
    if quant == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs compute capability 8.9")
    from gitcli.dist import autocast

    torch.manual_seed(0)
    dense = build_captioner(tiny_model_config(train_lm=False, train_vision=False), device="cuda")
    ckpt = save_checkpoint(dense, tmp_path / "ckpt")  # bnb-int8 loads saved weights
    results = {}
    for name in ("none", quant):
        model = load_checkpoint(ckpt, device="cuda", quant=name)
        model.config.train_lm = False
        from gitcli.model.captioner import freeze_for_training

        freeze_for_training(model)
        batch = {k: v.cuda() for k, v in fixed_batch(model, "captions").items()}
        with autocast("bf16", torch.device("cuda")):
            _, logits = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], batch["labels"])
        logits.float().sum().backward()
        grad = torch.cat([p.grad.flatten() for p in model.mapping.parameters()])
        results[name] = (logits.detach().float(), grad.float())
    (logits, grad), (ref_logits, ref_grad) = results[quant], results["none"]
    assert _relative(logits, ref_logits) < LOGIT_TOLERANCE
    assert grad.abs().sum() > 0 and _relative(grad, ref_grad) < GRADIENT_TOLERANCE


def test_a_run_saved_before_quant_resumes_with_its_format(tmp_path):
    from gitcli.config import DataConfig, TrainConfig, to_dict
    from gitcli.train.run_config import RUN_CONFIG_FILE, configs_for_resume, read_run_config

    for saved, expected in ((True, "bnb-int8"), (False, "none")):
        model = to_dict(tiny_model_config(lora_rank=4, train_lm=False))
        model.pop("quant")
        model["int8"] = saved
        (tmp_path / RUN_CONFIG_FILE).write_text(json.dumps(
            {"model": model, "data": to_dict(DataConfig()), "train": to_dict(TrainConfig()), "world_size": 1}))
        assert read_run_config(tmp_path)[0].quant == expected
    # --int8 typed again on resume is --quant bnb-int8: another format disagrees with the run
    (tmp_path / RUN_CONFIG_FILE).write_text(json.dumps(
        {"model": {**model, "int8": True}, "data": to_dict(DataConfig()), "train": to_dict(TrainConfig())}))
    assert configs_for_resume(tmp_path, {("model", "quant"): "bnb-int8"})[0].quant == "bnb-int8"
    with pytest.raises(GitcapError, match="--quant int8-weight disagrees with the run"):
        configs_for_resume(tmp_path, {("model", "quant"): "int8-weight"})
