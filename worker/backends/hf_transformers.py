"""Hugging Face transformers: the model loaded in this process, a micro-batch run as left-padded ``generate`` calls.

``generate`` takes one generation config per call, so a micro-batch runs as one call per distinct
sampling dict. Sampling fields map to transformers' names; fields a request leaves out keep the
model's own generation config. ``stop`` strings are applied to the decoded text, so they do not split
a batch. vLLM's ``presence_penalty`` and ``frequency_penalty`` have no transformers equivalent and are
ignored (``repetition_penalty`` is the one penalty transformers has).
"""

from __future__ import annotations

import gc
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpulb.errors import BackendError, ConfigError
from worker.backends.base import (
    LENGTH,
    STOP,
    Backend,
    BackendOutput,
    BackendRequest,
    EngineLoad,
    embedded,
    failed,
    import_engine,
    refused,
)

EXTRA = "transformers"  # pip install 'gpulb[transformers]'


EMBED_CHUNK = 32  # texts in one forward pass


@dataclass(frozen=True, slots=True)
class _Row:
    """A request ready for ``generate``: its position in the micro-batch and its prompt token ids."""

    index: int
    request: BackendRequest
    input_ids: list[int]


class TransformersBackend(Backend):
    """A causal LM on one GPU (or the CPU), through ``AutoModelForCausalLM.generate``.

    ``model_path`` is a local directory or a hub id; ``dtype`` is ``auto`` (the checkpoint's) or a torch
    dtype name (``bfloat16``, ``float16``, ``float32``); ``device`` defaults to cuda when there is one.
    """

    name = "transformers"
    can_embed = True

    def __init__(self, model_path: str, *, dtype: str = "auto", device: str | None = None) -> None:
        self.model_path = model_path
        self.dtype = dtype
        self.device = device
        self._torch: Any = None
        self._tokenizer: Any = None
        self._model: Any = None
        self._lock = threading.Lock()  # an abandoned (timed-out) call may still hold the model
        self._running = 0
        self._generated_tokens = 0

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        torch = import_engine("torch", EXTRA)
        transformers = import_engine("transformers", EXTRA)
        self._torch = torch
        self._check_path()
        dtype = self._torch_dtype()
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(self.model_path, padding_side="left")
            model = transformers.AutoModelForCausalLM.from_pretrained(self.model_path, dtype=dtype)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot load a transformers model from {self.model_path!r}: {exc}") from exc
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self._model = model.to(self.device).eval()
        self._tokenizer = tokenizer

    def _check_path(self) -> None:
        """Refuse at once a local path that does not exist (transformers would take it for a hub id and retry)."""
        path = self.model_path
        if not path:
            raise ConfigError("the transformers backend needs a model path (--model-path or --model)")
        looks_local = path.startswith((".", "/", "~")) or path.count("/") > 1
        if looks_local and not Path(path).expanduser().exists():
            raise ConfigError(f"model path {path!r} does not exist")

    def _torch_dtype(self) -> Any:
        if self.dtype == "auto":
            return "auto"
        dtype = getattr(self._torch, self.dtype, None)
        if not isinstance(dtype, self._torch.dtype):
            raise ConfigError(f"unknown dtype {self.dtype!r}: use auto or a torch dtype such as bfloat16")
        return dtype

    def engine_load(self) -> EngineLoad:
        return EngineLoad(running=self._running, waiting=0, generated_tokens=self._generated_tokens)

    def healthy(self) -> bool:
        return self._model is not None

    def shutdown(self) -> None:
        self._model = None  # not under the lock: a hung generate call must not block the exit
        gc.collect()
        if self._torch is not None and str(self.device).startswith("cuda"):
            self._torch.cuda.empty_cache()

    # -- generation --------------------------------------------------------------------------------

    def generate(self, requests: list[BackendRequest]) -> list[BackendOutput]:
        if self._model is None:
            raise BackendError("the transformers backend is not started (or was shut down)")
        outputs: list[BackendOutput | None] = [None] * len(requests)
        groups: dict[str, list[_Row]] = {}
        for index, request in enumerate(requests):
            if request.inputs is not None:
                continue  # embedded below, under the lock
            prepared = self._prepare(index, request)
            if isinstance(prepared, BackendOutput):
                outputs[index] = prepared
            else:
                groups.setdefault(_group_key(request.sampling), []).append(prepared)
        with self._lock:
            self._running = len(requests)
            try:
                for rows in groups.values():
                    for row, output in zip(rows, self._generate_group(rows), strict=True):
                        outputs[row.index] = output
                for index, request in enumerate(requests):
                    if request.inputs is not None:
                        outputs[index] = self._embed_safely(request.inputs)
            finally:
                self._running = 0
        return [out for out in outputs if out is not None]

    def _prepare(self, index: int, request: BackendRequest) -> _Row | BackendOutput:
        """Tokenize one prompt; a chat goes through the model's chat template (which adds its own BOS)."""
        tokenizer = self._tokenizer
        if request.messages is None:
            return _Row(index, request, tokenizer(request.prompt or "")["input_ids"])
        if not tokenizer.chat_template:
            return refused(f"model {self.model_path!r} has no chat template; send a prompt instead")
        try:
            text = tokenizer.apply_chat_template(request.messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # a template may raise on purpose (e.g. "roles must alternate")
            return refused(f"the chat template refused these messages: {type(exc).__name__}: {exc}")
        return _Row(index, request, tokenizer(text, add_special_tokens=False)["input_ids"])

    def _embed_safely(self, texts: list[str]) -> BackendOutput:
        """One request's embeddings; its failure (memory, a text too long) is its own, not its micro-batch's."""
        try:
            chunks = [self._embed(texts[i : i + EMBED_CHUNK]) for i in range(0, len(texts), EMBED_CHUNK)]
        except Exception as exc:
            return failed(f"transformers could not embed: {type(exc).__name__}: {exc}")
        return embedded([v for vectors, _ in chunks for v in vectors], sum(tokens for _, tokens in chunks))

    def _embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """Mean of the last hidden layer over each text's tokens, L2-normalised (the usual pooling of a decoder);
        the base model only: no logits over the vocabulary."""
        torch, tokenizer = self._torch, self._tokenizer
        batch = tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(self.device)
        positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # left padding must not shift a text
        with torch.inference_mode():
            hidden = self._model.base_model(**batch, position_ids=positions).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        vectors = torch.nn.functional.normalize(pooled.float(), dim=-1).tolist()
        return vectors, int(batch["attention_mask"].sum().item())

    def _generate_group(self, rows: list[_Row]) -> list[BackendOutput]:
        """One ``generate`` call for requests that share their sampling fields."""
        torch, tokenizer = self._torch, self._tokenizer
        sampling = rows[0].request.sampling
        max_new = max(row.request.max_tokens for row in rows)
        batch = tokenizer.pad({"input_ids": [row.input_ids for row in rows]}, return_tensors="pt").to(self.device)
        if sampling.get("seed") is not None:
            torch.manual_seed(sampling["seed"])
        with torch.inference_mode():
            sequences = self._model.generate(
                **batch,
                max_new_tokens=max_new,
                pad_token_id=tokenizer.pad_token_id,
                **generation_kwargs(sampling, max_new),
            )
        generated = sequences[:, batch["input_ids"].shape[1] :].tolist()
        outputs = [self._output(row, tokens) for row, tokens in zip(rows, generated, strict=True)]
        self._generated_tokens += sum(out.output_tokens for out in outputs)
        return outputs

    def _output(self, row: _Row, tokens: list[int]) -> BackendOutput:
        request = row.request
        tokens = tokens[: request.max_tokens]
        count, reason = len(tokens), LENGTH
        if not request.sampling.get("ignore_eos"):
            eos = self._eos_ids()
            first = next((i for i, token in enumerate(tokens) if token in eos), None)
            if first is not None:
                count, reason = first + 1, STOP
        text = self._decode(tokens[:count])
        stops = request.sampling.get("stop") or []
        cut = _first_stop(text, stops)
        if cut is not None:
            text, reason = text[:cut], STOP
            count = self._tokens_to_stop(tokens[:count], stops)
        return BackendOutput(text=text, output_tokens=count, prompt_tokens=len(row.input_ids), finish_reason=reason)

    def _eos_ids(self) -> set[int]:
        eos = self._model.generation_config.eos_token_id
        if eos is None:
            eos = self._tokenizer.eos_token_id
        return set(eos) if isinstance(eos, list) else {eos}

    def _decode(self, tokens: list[int]) -> str:
        return str(self._tokenizer.decode(tokens, skip_special_tokens=True))

    def _tokens_to_stop(self, tokens: list[int], stops: list[str]) -> int:
        """The fewest leading tokens whose text holds a stop string (a binary search: decoding grows with k)."""
        low, high = 1, len(tokens)
        while low < high:
            mid = (low + high) // 2
            if _first_stop(self._decode(tokens[:mid]), stops) is None:
                low = mid + 1
            else:
                high = mid
        return high


def generation_kwargs(sampling: dict[str, Any], max_new_tokens: int) -> dict[str, Any]:
    """``generate`` keyword arguments for vLLM-named sampling fields; absent fields keep the model's defaults.

    ``ignore_eos`` sets ``min_new_tokens`` to the whole budget: that masks EOS at every step, where
    ``eos_token_id=None`` would fall back to the model's generation config.
    """
    kwargs: dict[str, Any] = {}
    temperature = sampling.get("temperature")
    if temperature == 0:
        kwargs["do_sample"] = False
    elif temperature is not None:
        kwargs.update(do_sample=True, temperature=temperature)
    if sampling.get("top_k") is not None:
        kwargs["top_k"] = max(sampling["top_k"], 0)  # vLLM's -1 (no limit) is transformers' 0
    for name in ("top_p", "min_p", "repetition_penalty"):
        if sampling.get(name) is not None:
            kwargs[name] = sampling[name]
    if sampling.get("min_tokens"):
        kwargs["min_new_tokens"] = sampling["min_tokens"]
    if sampling.get("ignore_eos"):
        kwargs["min_new_tokens"] = max_new_tokens
    return kwargs


def _group_key(sampling: dict[str, Any]) -> str:
    """Requests with equal keys can share one ``generate`` call (stop strings are applied afterwards)."""
    return json.dumps({k: v for k, v in sampling.items() if k != "stop"}, sort_keys=True)


def _first_stop(text: str, stops: list[str]) -> int | None:
    """Where the earliest stop string starts in ``text``, if any does."""
    found = [i for i in (text.find(stop) for stop in stops if stop) if i >= 0]
    return min(found) if found else None
