"""Validation of a whole batch before anything is written: one bad request refuses the batch."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from gpulb.errors import InvalidRequest, field_error
from gpulb.keys import MAX_ABS_PRIORITY
from gpulb.models import RequestSpec
from gpulb.settings import MODEL_PATTERN, ProducerSettings

BATCH_ID_PATTERN = re.compile(r"^[0-9a-f]{16}$")  # checked with fullmatch: "$" alone lets a final newline through
HUGE_INT_BITS = 64  # an integer wider than this is shown by its size: str() of one over 4,300 digits raises
SHOWN_CHARS = 80


@dataclass(frozen=True, slots=True)
class CheckedRequest:
    """A batch-file line's or an HTTP body's request, validated once, limits included: ``spec`` is submitted as it is."""

    fields: dict[str, Any]  # as gpulb's Python API takes them (the body's OpenAI names translated)
    spec: RequestSpec


def shown(value: object) -> str:
    """``repr(value)`` for an error message, never raising: a huge integer by its size, long text cut."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > HUGE_INT_BITS:
        return f"an integer of about {int(value.bit_length() * 0.30103) + 1:,} digits"
    try:
        text = repr(value)
    except ValueError:  # a container holding a huge integer
        return f"a {type(value).__name__} too large to show"
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 3] + "..."


def validate_model(model: object) -> str:
    if not isinstance(model, str) or not re.fullmatch(MODEL_PATTERN, model):
        raise InvalidRequest(f"model: {shown(model)} is not a valid model name (must match {MODEL_PATTERN})")
    return model


def validate_priority(priority: object) -> int:
    if isinstance(priority, bool) or not isinstance(priority, int) or abs(priority) > MAX_ABS_PRIORITY:
        raise InvalidRequest(
            f"priority: {shown(priority)} must be an integer from {-MAX_ABS_PRIORITY} to {MAX_ABS_PRIORITY}"
        )
    return priority


MAX_RESULT_TTL_S = 10 * 365 * 24 * 3600


def validate_result_ttl(ttl_s: object) -> int | None:
    """Whole seconds (Redis's EXPIRE takes no fraction), from 1 s to 10 years; None keeps the default."""
    if ttl_s is None:
        return None
    if isinstance(ttl_s, bool) or not isinstance(ttl_s, int) or not 1 <= ttl_s <= MAX_RESULT_TTL_S:
        raise InvalidRequest(
            f"result_ttl_s: {shown(ttl_s)} must be a whole number of seconds from 1 to {MAX_RESULT_TTL_S}"
        )
    return ttl_s


MAX_METADATA_PAIRS = 16


def validate_metadata(metadata: object) -> dict[str, str]:
    """Up to 16 string pairs (keys up to 64 characters, values up to 512), as the OpenAI Batch API allows."""
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping) or len(metadata) > MAX_METADATA_PAIRS:
        raise InvalidRequest(f"metadata: expected a mapping of at most {MAX_METADATA_PAIRS} string pairs")
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str) or not 0 < len(key) <= 64 or len(value) > 512:
            raise InvalidRequest(f"metadata: {shown(key)}: keys must be 1-64 characters, values strings of up to 512")
        check_text("metadata key", key)
        check_text(f"metadata.{key}", value)
    return dict(metadata)


def validate_batch_id(batch_id: object) -> str:
    if not isinstance(batch_id, str) or not BATCH_ID_PATTERN.fullmatch(batch_id):
        raise InvalidRequest(f"batch_id: {shown(batch_id)} is not a gpulb batch id (16 lowercase hex digits)")
    return batch_id


def validate_requests(
    requests: Iterable[str | Mapping[str, Any] | RequestSpec | CheckedRequest], *, max_tokens: int,
    limits: ProducerSettings,
) -> list[RequestSpec]:  # fmt: skip
    """Every request as a :class:`RequestSpec`; raises :class:`InvalidRequest` naming index and field.

    A :class:`CheckedRequest` (from a batch file or the gateway, which name the line or the field of a bad one) is
    taken as it is. A :class:`RequestSpec` built in Python was validated when it was made: only the producer's size
    limits are checked, as they are this producer's settings."""
    if isinstance(requests, str | bytes | Mapping):
        raise InvalidRequest("requests: expected a list of prompts or request dicts, not a single value")
    specs = [_validate_one(index, item, max_tokens, limits) for index, item in enumerate(requests)]
    if not specs:
        raise InvalidRequest("requests: the batch is empty")
    if len(specs) > limits.max_batch_requests:
        raise InvalidRequest(
            f"requests: {len(specs)} requests exceed the limit of {limits.max_batch_requests} per batch "
            "(GPULB_PRODUCER__MAX_BATCH_REQUESTS)"
        )
    return specs


def _validate_one(index: int, item: object, max_tokens: int, limits: ProducerSettings) -> RequestSpec:
    if isinstance(item, CheckedRequest):
        return item.spec
    if isinstance(item, RequestSpec):
        try:
            check_limits(item, limits)
        except InvalidRequest as exc:
            raise InvalidRequest(f"request {index}: {exc}") from exc
        return item
    if isinstance(item, str):
        raw: dict[str, Any] = {"prompt": item}
    elif isinstance(item, Mapping):
        raw = dict(item)
    else:
        raise InvalidRequest(f"request {index}: expected a prompt string or a dict, got {type(item).__name__}")
    raw.setdefault("max_tokens", max_tokens)
    try:
        spec = RequestSpec.model_validate(raw)
        check_limits(spec, limits)
    except ValidationError as exc:
        raise InvalidRequest(f"request {index}: {describe_error(exc)}") from exc
    except InvalidRequest as exc:
        raise InvalidRequest(f"request {index}: {exc}") from exc
    return spec


def check_limits(spec: RequestSpec, limits: ProducerSettings) -> None:
    """The producer's size limits; raises :class:`InvalidRequest` naming the field and its setting."""
    check_text("", spec.model_dump(exclude_none=True))
    size = len(spec.input_text().encode())
    if size > limits.max_prompt_bytes:
        field = "prompt" if spec.prompt is not None else "messages" if spec.messages is not None else "input"
        raise InvalidRequest(
            f"{field}: {size} bytes exceeds the limit of {limits.max_prompt_bytes} bytes "
            "(GPULB_PRODUCER__MAX_PROMPT_BYTES)"
        )
    if spec.max_tokens > limits.max_tokens_limit:
        raise InvalidRequest(
            f"max_tokens: {shown(spec.max_tokens)} exceeds the limit of {limits.max_tokens_limit} "
            "(GPULB_PRODUCER__MAX_TOKENS_LIMIT)"
        )


def check_text(field: str, value: object) -> None:
    """Every string in ``value`` must be encodable as UTF-8: a lone surrogate ("\\ud800") can be neither sent nor
    stored. Raises :class:`InvalidRequest` naming the field (``messages.0.content``, ``stop.1``)."""
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError as exc:
            where = f"{field}: " if field else ""
            bad = value[exc.start]
            raise InvalidRequest(
                f"{where}{bad!r} at character {exc.start} is a lone surrogate, not text (it has no UTF-8 encoding)"
            ) from None
    elif isinstance(value, Mapping):
        for key, item in value.items():
            check_text(f"{field}.{key}" if field else str(key), item)
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            check_text(f"{field}.{index}", item)


def describe_error(exc: ValidationError, within: str = "") -> str:
    """The first error as ``field: message`` (and how many more); ``within`` prefixes the field (``body.top_p``) and
    names an error about the whole object, else ``request`` does."""
    field, message = field_error(exc.errors()[0])
    path = ".".join(part for part in (within, field) if part) or "request"
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{path}: {message}{more}"
