"""Tiny Llama-style models built from a seed: the demo's and the tests' own checkpoints (no download)."""

from __future__ import annotations

import os


def tiny_llama_config(vocab: int = 256, hidden: int = 64, layers: int = 4, heads: int = 4, inter: int = 128, tie: bool = False):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=256,
        tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )


def build_tiny_llama(seed: int = 0, dtype: str = "bfloat16", **cfg):
    """A randomly initialised LlamaForCausalLM (deterministic for a seed)."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**cfg))
    return model.to(getattr(torch, dtype))


def save_model(model, path: str | os.PathLike, tokenizer=None) -> str:
    """``save_pretrained`` into a fresh folder, atomically."""
    from rlsubnet.io.atomic import atomic_dir

    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return str(path)


def char_tokenizer():
    """A character-level fast tokenizer (printable ASCII plus <pad> <s> </s> <unk>), built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials)}
    for c in range(32, 127):
        vocab[chr(c)] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.padding_side = "left"
    return tok


def write_tiny_checkpoint(path, seed: int = 0, dtype: str = "bfloat16", **cfg) -> str:
    """A tiny Llama with a character tokenizer, saved as a normal HF folder (for tests and demos)."""
    tok = char_tokenizer()
    cfg.setdefault("vocab", 128)
    model = build_tiny_llama(seed=seed, dtype=dtype, **cfg)
    model.config.pad_token_id, model.config.bos_token_id, model.config.eos_token_id = 0, 1, 2
    return save_model(model, path, tok)
