"""The transformers backend on a tiny random Llama saved to disk and loaded back: the real loading path, no download."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gpulb.errors import ConfigError
from tests.tiny_model import build_tiny_model
from worker.backends.base import LENGTH, STOP, BackendRequest
from worker.backends.hf_transformers import TransformersBackend, generation_kwargs

GREEDY = {"temperature": 0}
CHAT = [{"role": "user", "content": "what is a GPU?"}]


def prompt(text: str, max_tokens: int, **sampling: Any) -> BackendRequest:
    return BackendRequest(prompt=text, max_tokens=max_tokens, sampling=sampling)


def chat(messages: list[dict[str, Any]], max_tokens: int, **sampling: Any) -> BackendRequest:
    return BackendRequest(prompt=None, messages=messages, max_tokens=max_tokens, sampling=sampling)


def started(path: Path) -> Iterator[TransformersBackend]:
    backend = TransformersBackend(str(path))
    backend.start()
    yield backend
    backend.shutdown()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def backend(model_dir: Path) -> Iterator[TransformersBackend]:
    yield from started(model_dir)


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def eager_eos_backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TransformersBackend]:
    yield from started(build_tiny_model(tmp_path_factory.mktemp("eager-eos"), eager_eos=True))


@pytest.fixture(scope="module")
def templateless_backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TransformersBackend]:
    yield from started(build_tiny_model(tmp_path_factory.mktemp("no-template"), chat_template=False))


class TestGenerate:
    def test_a_batch_of_prompts_gets_one_output_each_within_its_budget(
        self, backend: TransformersBackend, tokenizer: Any
    ) -> None:
        texts = ["hello", "the quick brown fox jumps over the lazy dog", "GPU", "load balancing spreads requests"]
        budgets = [3, 8, 5, 1]
        outputs = backend.generate([prompt(t, n) for t, n in zip(texts, budgets, strict=True)])
        assert [out.error for out in outputs] == [None] * 4
        assert [out.finish_reason for out in outputs] == [LENGTH] * 4  # the random model never says EOS here
        assert [out.output_tokens for out in outputs] == budgets
        assert [out.prompt_tokens for out in outputs] == [len(tokenizer(t)["input_ids"]) for t in texts]
        assert all(isinstance(out.text, str) for out in outputs)

    def test_left_padding_leaves_a_short_prompt_unchanged(self, backend: TransformersBackend) -> None:
        short = prompt("hello", 10, **GREEDY)
        long = prompt("the quick brown fox jumps over the lazy dog " * 4, 10, **GREEDY)
        [alone] = backend.generate([short])
        [long_alone] = backend.generate([long])
        assert backend.generate([long, short]) == [long_alone, alone]
        assert alone.output_tokens == 10 and alone.text

    def test_requests_with_different_sampling_come_back_in_order(self, backend: TransformersBackend) -> None:
        greedy = prompt("hello world", 6, **GREEDY)
        sampled = prompt("hello world", 4, temperature=1.5, top_p=0.9, seed=3)
        [greedy_alone] = backend.generate([greedy])
        [sampled_alone] = backend.generate([sampled])
        outputs = backend.generate([greedy, sampled, greedy])
        assert outputs == [greedy_alone, sampled_alone, greedy_alone]

    def test_a_seed_makes_sampling_repeatable(self, backend: TransformersBackend) -> None:
        request = prompt("the lazy dog", 12, temperature=1.0, top_k=50, min_p=0.01, repetition_penalty=1.1, seed=42)
        assert backend.generate([request]) == backend.generate([request])

    def test_a_stop_string_cuts_the_text_and_counts_the_tokens_that_made_it(self, backend: TransformersBackend) -> None:
        [full] = backend.generate([prompt("hello world", 16, **GREEDY)])
        stop = next(ch for ch in full.text[2:] if ch != "\ufffd" and ch not in full.text[:2])
        [out] = backend.generate([prompt("hello world", 16, stop=[stop], **GREEDY)])
        assert out.finish_reason == STOP
        assert out.text == full.text[: full.text.index(stop)]
        [made_it] = backend.generate([prompt("hello world", out.output_tokens, **GREEDY)])
        [one_less] = backend.generate([prompt("hello world", out.output_tokens - 1, **GREEDY)])
        assert stop in made_it.text and stop not in one_less.text


class TestEos:
    """A model that predicts EOS first at every step: greedy output stops at once unless EOS is masked."""

    def test_eos_stops_a_request_and_counts_as_an_output_token(self, eager_eos_backend: TransformersBackend) -> None:
        [out] = eager_eos_backend.generate([prompt("hello", 8, **GREEDY)])
        assert (out.text, out.output_tokens, out.finish_reason) == ("", 1, STOP)

    def test_ignore_eos_generates_exactly_max_tokens(self, eager_eos_backend: TransformersBackend) -> None:
        outputs = eager_eos_backend.generate([prompt("hello", n, ignore_eos=True, **GREEDY) for n in (4, 9)])
        assert [(out.output_tokens, out.finish_reason) for out in outputs] == [(4, LENGTH), (9, LENGTH)]

    def test_min_tokens_masks_eos_until_then(self, eager_eos_backend: TransformersBackend) -> None:
        [out] = eager_eos_backend.generate([prompt("hello", 8, min_tokens=3, **GREEDY)])
        assert (out.output_tokens, out.finish_reason) == (4, STOP)


class TestChat:
    def test_messages_go_through_the_chat_template(self, backend: TransformersBackend, tokenizer: Any) -> None:
        [out] = backend.generate([chat(CHAT, 5, **GREEDY)])
        templated = tokenizer.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True)["input_ids"]
        assert (out.error, out.output_tokens, out.prompt_tokens) == (None, 5, len(templated))
        assert templated.count(tokenizer.bos_token_id) == 1  # the template's BOS, not a second one

    def test_without_a_chat_template_a_chat_fails_and_a_prompt_runs(
        self, templateless_backend: TransformersBackend
    ) -> None:
        bad, good = templateless_backend.generate([chat(CHAT, 5), prompt("hello", 5)])
        assert bad.error is not None and bad.error.endswith("has no chat template; send a prompt instead")
        assert (bad.output_tokens, bad.retryable) == (0, False)
        assert (good.error, good.output_tokens) == (None, 5)


class TestLifecycle:
    def test_a_missing_path_is_a_config_error_naming_it(self, tmp_path: Path) -> None:
        missing = str(tmp_path / "no-such-model")
        with pytest.raises(ConfigError, match=missing):
            TransformersBackend(missing).start()

    def test_a_directory_without_a_model_is_a_config_error_naming_it(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match=str(tmp_path)):
            TransformersBackend(str(tmp_path)).start()

    def test_an_unknown_dtype_is_a_config_error(self, model_dir: Path) -> None:
        with pytest.raises(ConfigError, match="float99"):
            TransformersBackend(str(model_dir), dtype="float99").start()

    def test_generated_tokens_grow_by_the_output_tokens(self, backend: TransformersBackend) -> None:
        before = backend.engine_load().generated_tokens
        outputs = backend.generate([prompt("hello", 3), chat(CHAT, 6), prompt("fox", 2, temperature=0.7)])
        load = backend.engine_load()
        assert before is not None and load.generated_tokens == before + sum(out.output_tokens for out in outputs)
        assert (load.running, load.waiting, load.kv_cache_usage) == (0, 0, None)


def test_sampling_fields_map_to_generate_arguments() -> None:
    assert generation_kwargs({}, 16) == {}
    assert generation_kwargs({"temperature": 0, "seed": 1, "stop": ["x"], "presence_penalty": 1.0}, 16) == {
        "do_sample": False
    }
    sampled = {"temperature": 0.7, "top_p": 0.9, "top_k": -1, "min_p": 0.05, "repetition_penalty": 1.2, "min_tokens": 2}
    assert generation_kwargs(sampled, 16) == {
        "do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 0, "min_p": 0.05,
        "repetition_penalty": 1.2, "min_new_tokens": 2,
    }  # fmt: skip
    assert generation_kwargs({"ignore_eos": True, "min_tokens": 2}, 16) == {"min_new_tokens": 16}


class TestEmbeddings:
    def test_each_text_gets_a_unit_vector_the_same_alone_or_beside_a_longer_one(
        self, backend: TransformersBackend, tokenizer: Any
    ) -> None:
        texts = ["a short one", "a rather longer text than the first, to pad it"]
        [both, alone, chatty] = backend.generate([
            BackendRequest(None, 1, inputs=texts), BackendRequest(None, 1, inputs=texts[:1]), prompt("hello", 2),
        ])  # fmt: skip
        assert both.embeddings is not None and alone.embeddings is not None and both.error is None
        assert len(both.embeddings) == 2 and len({len(v) for v in both.embeddings}) == 1
        assert all(abs(sum(x * x for x in v) - 1) < 1e-5 for v in both.embeddings)
        assert all(abs(a - b) < 1e-4 for a, b in zip(both.embeddings[0], alone.embeddings[0], strict=True))
        assert both.embeddings[0] != both.embeddings[1]
        assert both.prompt_tokens == sum(len(tokenizer(t)["input_ids"]) for t in texts)
        assert (both.output_tokens, both.text) == (0, "") and chatty.output_tokens == 2 and chatty.embeddings is None
