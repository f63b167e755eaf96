"""Tiny offline models for tests and benchmarks: a BPE tokenizer trained locally with
``tokenizers`` and a random-init Llama built from a config. No download, seconds to build."""

from __future__ import annotations

from pathlib import Path
from typing import Any

CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CORPUS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "How many clips did Natalia sell altogether in April and May? #### 72",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting.",
    "Tracy used a piece of wire 4 feet long to support tomato plants in the garden.",
    "Definition: In this task, you are given a question. Answer with the correct option.",
    "Options:\n- Yes\n- No\n- Maybe\nThe answer is Yes because the statement is true.",
    "Sasha helped her friend move the couch. How would her friend feel afterwards? grateful",
    "Write a short story about a robot that learns to paint landscapes in the morning light.",
    "The quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat.",
    "Compute 3 + 4 * 2 = 11. Then 11 - 5 = 6. The final answer is 6.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "Translate to French: Good morning, how are you today? Bonjour, comment allez-vous?",
]


def make_tokenizer(out_dir: str | Path | None = None, vocab_size: int = 400) -> Any:
    """A fast byte-level BPE tokenizer with a chat template and special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        additional_special_tokens=[],
    )
    fast.chat_template = CHAT_TEMPLATE
    if out_dir is not None:
        fast.save_pretrained(out_dir)
    return fast


def make_model(
    vocab_size: int,
    out_dir: str | Path | None = None,
    *,
    hidden_size: int = 32,
    layers: int = 3,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate_size: int = 64,
    seed: int = 0,
    max_position_embeddings: int = 1024,
    dtype: Any = None,
) -> Any:
    """A random-init Llama causal LM (GQA when ``kv_heads < heads``)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    if dtype is not None:
        model = model.to(dtype)
    model.eval()
    if out_dir is not None:
        model.save_pretrained(out_dir)
    return model


def make_model_dir(out_dir: str | Path, **kw: Any) -> Path:
    """Tokenizer + model saved together in one folder usable as ``--model``."""
    out_dir = Path(out_dir)
    tok = make_tokenizer(out_dir)
    make_model(len(tok), out_dir, **kw)
    return out_dir
