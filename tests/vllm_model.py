"""A random Llama that the vLLM CPU build loads, and on which continuous batching pays: built locally, no hub.

Hidden 256, 4 layers, 4 heads of head_dim 64 (the CPU attention kernel refuses head_dim 16), float32
(bfloat16 on an AMX CPU can kill the engine with SIGILL). On a 2-core AMD EPYC VM, vLLM decoded ~105
tokens/s for one sequence, 1,280 for 64 and 1,430 for 128 (12-14x), so whether an engine is kept full
shows in its throughput.

The tokenizer is ``tests.tiny_model``'s byte-level BPE (about 300 tokens) with its chat template. The
weights are random except EOS's row of the output head, which is zero: from the random initialisation
alone, greedy decoding stops at the first token for every context whose largest logit happens to be EOS's.
With the row at zero, EOS's logit is exactly 0 against ~300 others spread around 0 (std ~0.3), so greedy
decoding never picks it, and sampling at temperature 1 picks it with a probability of about 1/300 a step:
without ``ignore_eos``, a sampled output of up to 256 tokens ends at EOS ("stop") about half the time, at
``max_tokens`` ("length") otherwise; with ``ignore_eos`` every output is exactly ``max_tokens`` long.

The directory is reused when it already holds a build of the same :data:`SPEC`: a rebuild takes a few
seconds, a reuse none.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.tiny_model import _tokenizer

SPEC: dict[str, Any] = {
    "version": 1,
    "hidden_size": 256,
    "intermediate_size": 1024,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
    "seed": 1234,
}
STAMP = "gpulb-vllm-model.json"
FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", STAMP)


def build_vllm_model(directory: Path) -> Path:
    """Save the random Llama of :data:`SPEC` and its tokenizer in ``directory`` (created); return ``directory``.

    A directory that already holds every file of a build of the same spec is returned as it is.
    """
    if is_built(directory):
        return directory
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    tokenizer = _tokenizer(chat_template=True)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=SPEC["hidden_size"], intermediate_size=SPEC["intermediate_size"],
        num_hidden_layers=SPEC["num_hidden_layers"], num_attention_heads=SPEC["num_attention_heads"],
        num_key_value_heads=SPEC["num_key_value_heads"], max_position_embeddings=SPEC["max_position_embeddings"],
        tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, dtype="float32",
    )  # fmt: skip
    torch.manual_seed(SPEC["seed"])
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # type: ignore[no-untyped-call]
    with torch.no_grad():
        model.get_output_embeddings().weight[tokenizer.eos_token_id].zero_()
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / STAMP).write_text(json.dumps(SPEC, sort_keys=True))
    return directory


def is_built(directory: Path) -> bool:
    """Whether ``directory`` holds a complete build of the current :data:`SPEC`."""
    if not all((directory / name).is_file() for name in FILES):
        return False
    try:
        return bool(json.loads((directory / STAMP).read_text()) == SPEC)
    except ValueError:
        return False
