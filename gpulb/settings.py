"""All configuration, in one pydantic-settings class.

Every field can be set from the environment with the ``GPULB_`` prefix; nested sections use
``__``: ``GPULB_REDIS_URL``, ``GPULB_WORKER__TOKENS_PER_S``, ``GPULB_BALANCER__BATCH_TARGET_S``.
Command-line options override the environment. Nothing here is read at import time: build a
:class:`Settings` where it is needed (tests pass ``_env_file=None`` and explicit values).
"""

from __future__ import annotations

import re
import socket
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Checked with re.fullmatch, never re.match: "$" alone matches before a final newline ("demo\n")
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
MODEL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_./:@+-]{0,255}$"

PositiveFloat = Annotated[float, Field(gt=0)]
# balancer.policy.PolicyName's values; repeated here because settings must not import a role
POLICY_NAMES = ("least-time", "prefix-affinity", "round-robin", "random", "least-loaded", "power-of-two")


class LogFormat(StrEnum):
    AUTO = "auto"
    JSON = "json"
    CONSOLE = "console"


class BackendName(StrEnum):
    SIMULATED = "simulated"  # a continuous-batching engine
    SIMULATED_LINEAR = "simulated-linear"  # the old model: a micro-batch takes its tokens / tokens_per_s
    TRANSFORMERS = "transformers"
    OPENAI = "openai"
    VLLM = "vllm"
    TENSORRT_LLM = "tensorrt-llm"


class RedisSettings(BaseModel):
    """How every role reaches Redis."""

    connect_timeout_s: PositiveFloat = 3.0
    socket_timeout_s: PositiveFloat = 10.0
    password: SecretStr | None = None
    ssl_ca_certs: str | None = None
    max_backoff_s: PositiveFloat = 5.0
    # Acknowledge a submitted batch, a recorded result and a result read only once Redis has fsynced it to its AOF
    # (WAITAOF: Redis >= 7.2 or Valkey, with appendonly yes). Costs about one fsync period per acknowledgement.
    durable_acks: bool = False
    durable_timeout_s: PositiveFloat = 5.0


class ProducerSettings(BaseModel):
    """Limits the producer enforces before anything is written."""

    max_prompt_bytes: int = Field(default=1 << 20, ge=1)
    max_tokens_limit: int = Field(default=131_072, ge=1)
    # an OpenAI request body without max_tokens (a batch file line, the gateway's online and batch endpoints)
    default_max_tokens: int = Field(default=1024, ge=1)
    max_batch_requests: int = Field(default=1_000_000, ge=1)
    chunk_size: int = Field(default=5_000, ge=1)
    result_ttl_s: int = Field(default=7 * 24 * 3600, ge=1)
    poll_fallback_s: PositiveFloat = 1.0
    reconnect_grace_s: PositiveFloat = 30.0


class BalancerSettings(BaseModel):
    """How the balancer sizes and places micro-batches."""

    policy: str = "least-time"
    batch_target_s: PositiveFloat = 0.5
    max_outstanding_batches: int = Field(default=2, ge=1)
    prior_tokens_per_s: PositiveFloat = 1000.0
    idle_wake_s: PositiveFloat = 1.0
    job_timeout_s: int = Field(default=900, ge=1)
    job_result_ttl_s: int = Field(default=300, ge=0)
    snapshot_refresh_s: PositiveFloat = 1.0
    affinity_abs_s: float = Field(default=0.5, ge=0)
    affinity_rel: float = Field(default=1.5, ge=1.0)
    affinity_scan: int = Field(default=256, ge=1)

    @field_validator("policy")
    @classmethod
    def _known_policy(cls, value: str) -> str:
        if value not in POLICY_NAMES:
            raise ValueError(f"unknown policy {value!r}; choose one of {', '.join(POLICY_NAMES)}")
        return value


class WorkerSettings(BaseModel):
    """One worker process: which GPU, which model, which backend, and how it copes with failure."""

    id: str | None = None
    model: str | None = None
    backend: BackendName = BackendName.SIMULATED
    tokens_per_s: PositiveFloat = 1000.0
    max_batch: int = Field(default=64, ge=1)
    # Continuous engines: sequences run at once (default: what the engine says, e.g. vLLM's max_num_seqs), and
    # requests held beyond them, ready for the next free slot (default: a quarter of the slots).
    slots: int | None = Field(default=None, ge=1)
    queue_slots: int | None = Field(default=None, ge=0)
    gpu: int | None = Field(default=None, ge=0)
    heartbeat_s: PositiveFloat = 1.0
    load_ttl_s: PositiveFloat = 8.0
    ema_alpha: float = Field(default=0.3, gt=0, le=1)
    retry_backoff_s: PositiveFloat = 0.5
    drain_timeout_s: PositiveFloat = 600.0  # on SIGTERM, how long to wait for the requests in the engine
    min_call_timeout_s: PositiveFloat = 120.0
    call_timeout_factor: PositiveFloat = 10.0
    simulate_faults: bool = False
    # Real engines. model_path: what the engine loads (a local directory or hub id; default: model).
    model_path: str | None = None
    dtype: str = "auto"
    engine_args: dict[str, Any] = Field(default_factory=dict)  # extra keyword arguments for vLLM / TensorRT-LLM
    startup_timeout_s: PositiveFloat = 900.0  # loading a model, or waiting for an engine server to answer
    # The openai backend: a local OpenAI-compatible server (vllm serve, trtllm-serve, SGLang).
    base_url: str | None = None
    api_key: SecretStr | None = None
    served_model: str | None = None  # the model name the server knows (default: model)
    metrics_path: str | None = None  # default: /metrics, then /prometheus/metrics (trtllm-serve)
    request_timeout_s: PositiveFloat = 600.0
    max_concurrency: int = Field(default=256, ge=1)

    @field_validator("id")
    @classmethod
    def _valid_id(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(ID_PATTERN, value):
            raise ValueError(f"worker id {value!r} must match {ID_PATTERN} (it names an RQ queue)")
        return value

    @field_validator("model")
    @classmethod
    def _valid_model(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(MODEL_PATTERN, value):
            raise ValueError(f"model {value!r} must match {MODEL_PATTERN}")
        return value

    def resolved_id(self) -> str:
        """The worker id, defaulting to ``HOST-gpuN`` (or ``HOST-PID`` without a GPU)."""
        if self.id:
            return self.id
        host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname()) or "host"
        suffix = f"gpu{self.gpu}" if self.gpu is not None else "cpu"
        return f"{host}-{suffix}"


class GatewaySettings(BaseModel):
    """The OpenAI-compatible HTTP gateway (``gpulb gateway``)."""

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    api_keys: list[SecretStr] = Field(default_factory=list)  # GPULB_GATEWAY__API_KEYS='["sk-1", "sk-2"]'
    # keys that see every tenant's files and batches: GPULB_GATEWAY__ADMIN_API_KEYS='["sk-admin"]'
    admin_api_keys: list[SecretStr] = Field(default_factory=list)
    max_file_bytes: int = Field(default=200 << 20, ge=1)
    max_json_bytes: int = Field(default=4 << 20, ge=1)  # the body of a JSON endpoint (batches, completions, chat)
    header_timeout_s: PositiveFloat = 10.0  # a connection without a whole request head for this long is closed
    body_timeout_s: PositiveFloat = 30.0  # a request body must arrive within this, extended by body_min_bytes_per_s
    body_min_bytes_per_s: int = Field(default=65_536, ge=1)  # each this many bytes received add 1 s to it
    keep_alive_timeout_s: int = Field(default=5, ge=1)  # an idle keep-alive connection is closed after this
    file_ttl_s: int = Field(default=30 * 24 * 3600, ge=60)  # uploads and output files, as OpenAI keeps them
    online_result_ttl_s: int = Field(default=60, ge=1)  # an online request's result, once answered
    online_priority: int = Field(default=100, ge=-255, le=255)  # online requests go before batch traffic
    online_timeout_s: PositiveFloat = 600.0
    max_waiting_online: int = Field(default=256, ge=1)  # online requests waiting for results at once


class Settings(BaseSettings):
    """Every gpulb setting. Environment: ``GPULB_<FIELD>`` and ``GPULB_<SECTION>__<FIELD>``."""

    model_config = SettingsConfigDict(
        env_prefix="GPULB_",
        env_nested_delimiter="__",
        env_file=".env",
        extra="ignore",
    )

    redis_url: str = "redis://localhost:6379/0"
    max_attempts: int = Field(default=3, ge=1)
    log_level: str = "info"
    log_format: LogFormat = LogFormat.AUTO
    metrics_port: int | None = Field(default=None, ge=1, le=65535)  # Prometheus /metrics of a balancer or worker
    redis: RedisSettings = RedisSettings()
    producer: ProducerSettings = ProducerSettings()
    balancer: BalancerSettings = BalancerSettings()
    worker: WorkerSettings = WorkerSettings()
    gateway: GatewaySettings = GatewaySettings()
