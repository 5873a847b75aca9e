"""Tiny, randomly initialised causal LMs built in code, for tests and smoke runs.

``build_tiny_model_dir`` writes a complete Hugging Face model folder (a 2-layer Llama and
a byte-level tokenizer with a ChatML template), so anything that takes ``--base DIR``
can run on it in seconds without a download.
"""

from __future__ import annotations

from pathlib import Path

import torch

from matlora import base_model as _base_model  # noqa: F401  (sets HF_HUB_OFFLINE before transformers loads)

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tiny_tokenizer():
    """Return a byte-level tokenizer: 256 byte tokens, then the ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_to_unicode = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: index for index, symbol in enumerate(sorted(byte_to_unicode))}
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(vocab_size: int, seed: int = 0, hidden_size: int = 64, num_layers: int = 2):
    """Return a randomly initialised LlamaForCausalLM (float32, eval mode)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 3,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # Larger weights than the default 0.02 init, so the random model's next-token
    # distribution is far from uniform and greedy ties are rare.
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0.0, 0.2)
    return model.eval()


def build_tiny_model_dir(path: str | Path, seed: int = 0) -> Path:
    """Write a tiny model and tokenizer to ``path`` (created if needed) and return it."""
    path = Path(path)
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(len(tokenizer), seed=seed)
    model.config.name_or_path = f"tiny-llama-seed{seed}"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
