"""The tiny preset: a small ViT and a small OPT-style LM with a word-level tokenizer.

It exists nowhere but here, so checkpoints save it whole; once saved it loads through the
same `open_clip.create_model` / `from_pretrained` paths as real models.
"""

from __future__ import annotations

from gitcli.config import TINY_LM, TINY_VISION, TINY_VOCABULARY, ModelConfig

SPECIAL_TOKENS = {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "unk": "<unk>"}


def tiny_model_config(**overrides) -> ModelConfig:
    """Defaults of the tiny preset: GIT-style patch grid through a linear+LayerNorm map.

    Nothing of it is pretrained, so by default everything trains: tower, mapping and LM.
    """
    fields = dict(
        vision=TINY_VISION, vision_pretrained=None, grid=True, mapping="linear-ln",
        lm=TINY_LM, preset="tiny", caption_prompt="", train_vision=True, train_lm=True,
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def build_tiny_tokenizer(vocabulary: list[str] | tuple[str, ...] = TINY_VOCABULARY):
    """A word-level tokenizer over `vocabulary` (the preset's own by default) in the
    standard transformers format."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = list(SPECIAL_TOKENS.values()) + sorted({w for w in vocabulary} - set(SPECIAL_TOKENS.values()))
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=SPECIAL_TOKENS["unk"]))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()  # splits punctuation off: "circle?" -> "circle", "?"
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=SPECIAL_TOKENS["pad"], bos_token=SPECIAL_TOKENS["bos"],
        eos_token=SPECIAL_TOKENS["eos"], unk_token=SPECIAL_TOKENS["unk"],
    )


def build_tiny_lm(tokenizer):
    """A 3-layer, 128-wide OPT decoder sized to the tokenizer."""
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(
        vocab_size=len(tokenizer), hidden_size=128, num_hidden_layers=3, num_attention_heads=4,
        ffn_dim=512, max_position_embeddings=256, word_embed_proj_dim=128,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, dropout=0.0, attention_dropout=0.0,
        do_layer_norm_before=True, tie_word_embeddings=True,
    )
    return OPTForCausalLM(config)
