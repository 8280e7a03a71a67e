"""A tiny random Llama and its tokenizer, built and saved locally: no download, loads in well under a second.

Its outputs are gibberish (test token counts, not text). The tokenizer is byte-level BPE, adds ``<s>``
before a prompt, and (unless asked not to) has a chat template that starts with ``<s>`` too.
Torch, tokenizers and transformers are imported only when a model is built.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
CORPUS = [
    "hello world, hello there",
    "the quick brown fox jumps over the lazy dog",
    "user: what is a GPU?\nassistant: a processor for parallel work.",
    "Load balancing spreads requests over workers 0123456789.",
]


def build_tiny_model(directory: Path, *, chat_template: bool = True, eager_eos: bool = False) -> Path:
    """Save a tiny random Llama and its tokenizer in ``directory`` (created); return ``directory``.

    ``eager_eos``: the model predicts EOS first at every step, so greedy decoding stops at once unless
    EOS is masked (``ignore_eos``, ``min_tokens``).
    """
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    tokenizer = _tokenizer(chat_template)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(1234)
    model = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    if eager_eos:
        _make_eos_eager(model, tokenizer.eos_token_id)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _tokenizer(chat_template: bool) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=[PAD, BOS, EOS, UNK], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(CORPUS, trainer)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, backend.token_to_id(BOS))]
    )
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=backend, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK, padding_side="left",
        chat_template=CHAT_TEMPLATE if chat_template else None,
    )  # fmt: skip


def _make_eos_eager(model: Any, eos_id: int) -> None:
    """Give EOS a large logit everywhere: hidden dimension 0 of every embedding is a constant 1 (the random
    weights are ~0.02), so it survives the two small layers and the norm, and only EOS reads it."""
    import torch

    with torch.no_grad():
        model.get_input_embeddings().weight[:, 0] = 1.0
        head = model.get_output_embeddings().weight
        head[:, 0] = 0.0
        head[eos_id, 0] = 1.0
