"""The model stack: mappings, loss masking, 8-bit LM, checkpoints, real formats."""

import json
import re

import pytest
import torch

from gitcli.config import ModelConfig
from gitcli.data.text import IGNORE, encode_pair, pad_right
from gitcli.errors import GitcapError
from gitcli.model.captioner import build_captioner
from gitcli.model.checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint
from gitcli.model.tiny import tiny_model_config


def _pixels(model, images):
    tf = model.image_transform()
    return torch.stack([tf(im) for im in images])


def _batch(model, pairs):
    rows = [encode_pair(model.tokenizer, p, t) for p, t in pairs]
    return pad_right([r[0] for r in rows], [r[1] for r in rows], model.tokenizer.pad_token_id)


PAIRS = [("", "a red circle on the left"), ("Question: what color is the circle? Answer:", "red"),
         ("Question: how many shapes are there? Answer:", "two")]


@pytest.mark.parametrize("mapping,grid", [
    ("linear", False), ("linear", True), ("linear-ln", False), ("linear-ln", True),
    ("mlp", False), ("transformer", False), ("transformer", True),
])
def test_each_mapping_trains_pooled_and_grid(vocab, scene_images, mapping, grid):
    torch.manual_seed(0)
    model = build_captioner(tiny_model_config(mapping=mapping, grid=grid, prefix_length=4, mapping_layers=1,
                                              train_vision=False, train_lm=False), vocabulary=vocab)
    expected_prefix = model.vision.num_tokens if (grid and mapping.startswith("linear")) else 4
    assert model.prefix_length == expected_prefix
    px = _pixels(model, scene_images[:3])
    assert model.image_prefix(px).shape == (3, expected_prefix, model.lm.config.hidden_size)
    loss, logits = model(px, **_batch(model, PAIRS))
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.mapping.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in model.lm.parameters())  # frozen LM gets no gradient
    assert all(p.grad is None for p in model.vision.parameters())


def test_mlp_mapping_refuses_grid(vocab):
    with pytest.raises(GitcapError, match="pooled"):
        build_captioner(tiny_model_config(mapping="mlp", grid=True), vocabulary=vocab)


def test_labels_mask_prompt_and_padding(tiny_captioner):
    tok = tiny_captioner.tokenizer
    batch = _batch(tiny_captioner, PAIRS)
    prompt_len = len(tok(PAIRS[1][0], add_special_tokens=False)["input_ids"])
    target = tok(" red", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    row = batch["labels"][1].tolist()
    width = batch["labels"].shape[1]
    assert row == [IGNORE] * prompt_len + target + [IGNORE] * (width - prompt_len - len(target))
    assert batch["attention_mask"][1].sum() == prompt_len + len(target)


@torch.no_grad()
def test_loss_counts_only_target_tokens(tiny_captioner, scene_images):
    """Hand-checked: the loss is the mean cross-entropy over target positions alone."""
    model = tiny_captioner
    px = _pixels(model, scene_images[:3])
    batch = _batch(model, PAIRS)
    loss, _ = model(px, **batch)

    # by hand: full LM forward on [prefix | text], read logits one step before each target
    prefix = model.image_prefix(px)
    embeds = torch.cat([prefix, model.embed_tokens(batch["input_ids"])], 1)
    mask = torch.cat([torch.ones(3, prefix.shape[1], dtype=torch.long), batch["attention_mask"]], 1)
    logits = model.lm(inputs_embeds=embeds, attention_mask=mask).logits
    p = prefix.shape[1]
    terms = []
    for b in range(3):
        for i, label in enumerate(batch["labels"][b].tolist()):
            if label != IGNORE:
                terms.append(-torch.log_softmax(logits[b, p + i - 1], -1)[label])
    assert torch.allclose(loss, torch.stack(terms).mean(), atol=1e-5)

    # padding content and prompt labels cannot matter: change them, same loss
    changed = {k: v.clone() for k, v in batch.items()}
    changed["input_ids"][batch["attention_mask"] == 0] = 5
    loss2, _ = model(px, **changed)
    assert torch.allclose(loss, loss2, atol=1e-6)


def test_tiny_checkpoint_round_trip_is_identical(tiny_captioner, tiny_checkpoint, scene_images):
    from gitcli.config import GenerationConfig
    from gitcli.generate import generate

    loaded = load_checkpoint(tiny_checkpoint).eval()
    px = _pixels(tiny_captioner, scene_images[:3])
    batch = _batch(tiny_captioner, PAIRS)
    with torch.no_grad():
        a = tiny_captioner(px, **batch)[1]
        b = loaded(px, **batch)[1]
    assert torch.equal(a, b)
    gen = GenerationConfig(max_new_tokens=6)
    assert [g.text for g in generate(tiny_captioner, px, None, gen)] == [g.text for g in generate(loaded, px, None, gen)]
    saved = json.loads((tiny_checkpoint / "gitcap.json").read_text())
    assert saved["model"]["preset"] == "tiny"
    assert (tiny_checkpoint / "lm" / "model.safetensors").is_file()
    assert (tiny_checkpoint / "tokenizer" / "tokenizer.json").is_file()


@pytest.fixture(scope="module")
def hub_format_models(tmp_path_factory, vocab):
    """A GPT-2 saved as a transformers directory and an open_clip weights file."""
    import open_clip
    from safetensors.torch import save_file
    from transformers import GPT2Config, GPT2LMHeadModel

    from gitcli.config import TINY_VISION
    from gitcli.model.tiny import build_tiny_tokenizer
    from gitcli.model.vision import _register_configs

    root = tmp_path_factory.mktemp("hub")
    tok = build_tiny_tokenizer(vocab)
    torch.manual_seed(1)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=2, n_positions=128,
                                      eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id))
    gpt2.save_pretrained(root / "gpt2")
    tok.save_pretrained(root / "gpt2")
    _register_configs()
    clip = open_clip.create_model(TINY_VISION, pretrained=None)
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, root / "clip.safetensors")
    return root


def test_real_formats_round_trip_with_trained_parts(hub_format_models, scene_images, tmp_path):
    """Vision from an open_clip weights file, LM from a transformers directory, LoRA on."""
    from gitcli.config import TINY_VISION

    cfg = ModelConfig(vision=TINY_VISION, vision_pretrained=str(hub_format_models / "clip.safetensors"),
                      lm=str(hub_format_models / "gpt2"), mapping="transformer", prefix_length=3,
                      mapping_layers=1, train_vision=True, lora_rank=4)
    torch.manual_seed(0)
    model = build_captioner(cfg)
    # training moves the tower and the adapters away from what can be fetched again
    with torch.no_grad():
        for p in list(model.vision.parameters())[:3]:
            p.add_(0.01)
        for n, p in model.lm.named_parameters():
            if "lora_B" in n:
                p.normal_()
    model.eval()
    ckpt = save_checkpoint(model, tmp_path / "ckpt")
    assert (ckpt / "vision.safetensors").is_file() and (ckpt / "lora.safetensors").is_file()
    assert not (ckpt / "lm").exists()  # the LM is referenced, not copied
    loaded = load_checkpoint(ckpt).eval()
    px = _pixels(model, scene_images[:2])
    batch = _batch(model, PAIRS[:2])
    with torch.no_grad():
        assert torch.equal(model(px, **batch)[1], loaded(px, **batch)[1])


def test_int8_lm_loads_and_runs_on_cpu(tiny_checkpoint, scene_images):
    import bitsandbytes as bnb

    model = load_checkpoint(tiny_checkpoint, quant="bnb-int8").eval()
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in model.lm.modules())
    px = _pixels(model, scene_images[:2])
    with torch.no_grad():
        loss, logits = model(px, **_batch(model, PAIRS[:2]))
    assert torch.isfinite(loss) and logits.shape[0] == 2
    ref = load_checkpoint(tiny_checkpoint).eval()
    with torch.no_grad():
        ref_logits = ref(px, **_batch(ref, PAIRS[:2]))[1]
    # 8-bit weights: close to the full-precision model, not equal
    assert torch.allclose(logits, ref_logits, atol=0.5) and not torch.equal(logits, ref_logits)


def test_unknown_names_are_user_errors(vocab):
    with pytest.raises(GitcapError, match="unknown vision tower"):
        build_captioner(tiny_model_config(vision="ViT-Nope-99"), vocabulary=vocab)
    with pytest.raises(GitcapError, match="hf download"):
        build_captioner(ModelConfig(vision="gitcap-tiny-vit", vision_pretrained=None, lm="no-such-org/no-such-lm"))
    with pytest.raises(GitcapError, match="pretrained tag"):
        build_captioner(ModelConfig(vision="gitcap-tiny-vit", vision_pretrained="not-a-tag"))


def test_a_weights_file_that_is_not_one_is_a_user_error(tmp_path):
    bad = tmp_path / "weights.safetensors"
    bad.write_text("not weights")
    with pytest.raises(GitcapError, match="open_clip checkpoint"):
        build_captioner(ModelConfig(vision="gitcap-tiny-vit", vision_pretrained=str(bad)))


def test_foreign_directory_is_not_a_checkpoint(tmp_path):
    with pytest.raises(GitcapError, match="not a gitcap checkpoint"):
        resolve_checkpoint(tmp_path)
    (tmp_path / "gitcap.json").write_text('{"something": "else"}')
    with pytest.raises(GitcapError, match="not a gitcap checkpoint"):
        load_checkpoint(tmp_path)


def test_aliases_resolve():
    cfg = ModelConfig(vision="ViT-L/14", lm="opt-2.7b")
    assert (cfg.vision, cfg.lm) == ("ViT-L-14", "facebook/opt-2.7b")
    assert ModelConfig(lm="llama-7b").lm == "huggyllama/llama-7b"


def test_a_frozen_tower_stays_in_eval_mode_while_the_rest_trains(vocab):
    """A ResNet tower's BatchNorm must not update its statistics when the tower is frozen."""
    import dataclasses

    from gitcli.model.captioner import build_captioner
    from gitcli.model.tiny import tiny_model_config

    frozen = build_captioner(dataclasses.replace(tiny_model_config(), train_vision=False), vocabulary=vocab)
    frozen.train()
    assert frozen.mapping.training and frozen.lm.training
    assert not any(m.training for m in frozen.vision.modules())
    trained = build_captioner(tiny_model_config(), vocabulary=vocab).train()
    assert trained.vision.training
    assert not frozen.train(False).mapping.training


def test_tiny_preset_builds_with_its_own_vocabulary_covering_every_synthetic_word(tiny_captioner):
    """The one builder needs no vocabulary handed in for the tiny preset, builds the same
    tokenizer as before (the conftest model hands the synthetic word list in), and no
    synthetic caption, question or answer falls outside it."""
    from gitcli.data.synthetic import make_scene
    from gitcli.model.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    assert tok.get_vocab() == tiny_captioner.tokenizer.get_vocab()
    built = build_captioner(tiny_model_config(train_lm=False))
    assert built.tokenizer.get_vocab() == tok.get_vocab()
    texts = []
    for i in range(200):
        scene = make_scene(7, i)
        texts += scene.captions + [t for qa in scene.qa for t in qa]
    ids = tok(" ".join(texts), add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids


def test_model_and_data_do_not_import_each_other_and_no_one_builds_through_the_train_loop():
    """The layering the tiny vocabulary had to respect, and the one public builder."""
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[1] / "gitcli"
    for package, other in (("model", "data"), ("data", "model")):
        for path in (root / package).glob("*.py"):
            assert not re.search(rf"gitcli\.{other}\b", path.read_text()), f"{path} imports gitcli.{other}"
    for path in root.rglob("*.py"):
        text = path.read_text()
        assert "_build_model" not in text or path.name == "loop.py", f"{path} uses the train loop's private builder"
        if path.name != "memory.py":  # the dry run builds on the meta device, not through the builder yet
            assert "synthetic import vocabulary" not in text, f"{path} builds the tiny vocabulary itself"


@pytest.mark.parametrize("field, value, message", [
    ("question_template", "{question.__class__.__mro__}", "no other braces"),
    ("question_template", "Q: {question:>100000} A:", "no other braces"),
    ("question_template", "Q: {question} {other} A:", "no other braces"),
    ("question_template", "Q: {{question}} A:", "no other braces"),
    ("question_template", "no placeholder", "placeholder {question}"),
    ("prefix_length", "10", "field 'prefix_length' must be int"),
    ("grid", "yes", "field 'grid' must be bool"),
    ("lora_rank", True, "field 'lora_rank' must be int"),
    ("vision", ["ViT-B-32"], "field 'vision' must be str"),
    ("vision_pretrained", 3, "field 'vision_pretrained' must be str or null"),
    ("prefix_length", 10**12, "at most"),
    ("mapping_layers", 10**9, "at most"),
])
def test_a_hostile_gitcap_json_is_refused_in_one_line_naming_the_field(tiny_checkpoint, tmp_path, field, value,
                                                                       message):
    import shutil

    from gitcli.model.checkpoint import read_checkpoint_config

    ckpt = tmp_path / "sent"
    shutil.copytree(tiny_checkpoint, ckpt)
    meta = json.loads((ckpt / "gitcap.json").read_text())
    meta["model"][field] = value
    (ckpt / "gitcap.json").write_text(json.dumps(meta))
    with pytest.raises(GitcapError, match=re.escape(message)) as err:
        read_checkpoint_config(ckpt)
    assert "gitcap.json" in str(err.value) and "\n" not in str(err.value)


def test_question_template_is_filled_by_plain_replacement():
    from gitcli.data.text import prompt_text

    config = ModelConfig(question_template="Q: {question} A: ({question})")
    config.validate()
    assert prompt_text(config, " what is {0} or {question.__class__}? ") == \
        "Q: what is {0} or {question.__class__}? A: (what is {0} or {question.__class__}?)"


def test_a_checkpoint_follows_the_umask_not_its_writers_private_modes(tiny_checkpoint):
    # safetensors creates its files 0600; colleagues on a shared file system must read them
    import os
    import stat

    from gitcli.formats.atomic import dir_mode, file_mode

    for root, dirs, files in os.walk(tiny_checkpoint):
        assert stat.S_IMODE(os.stat(root).st_mode) == dir_mode(), root
        for name in files:
            assert stat.S_IMODE(os.stat(os.path.join(root, name)).st_mode) == file_mode(), name
