"""The rollout engine: vLLM's `AsyncLLM` behind a small typed surface (token ids in; token ids, sampling
log-probs and finish reasons out).

Guarantees:
- log-probs are those of the distribution actually sampled from (vLLM `logprobs_mode="processed_logprobs"`:
  after temperature and top-p), one per sampled token, aligned with the token ids;
- every call is a separate engine request, so callers batch by issuing calls concurrently (vLLM's scheduler
  packs them); a request's n samples share one prefill (vLLM parallel sampling, seeds seed + j);
- engine failures surface as `Unavailable` (503), inputs vLLM refuses as `InvalidInput` (422); nothing
  here lets a request kill the process.
On CPU the KV cache is sized explicitly (`rollout.kv_cache_bytes`) and the model runs eagerly; weights are
loaded in place through `services.rollout.vllm_worker` (the one module that knows vLLM's internals). On GPU a
replica's engine spans every GPU the replica holds: tensor parallelism of `gpus.per_replica`, or of the GPUs
its claim gave it (`tensor_parallel_size`); NCCL weight transfer takes one GPU per replica. With
`rollout.sleep_mode` (GPU only; refused at start on CPU) the engine sleeps on request and answers 409 to
generation and weight loads until it wakes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

from services.core.config import ConfigError, RunConfig
from services.core.errors import Conflict, InvalidInput, Unavailable
from services.core.model_fit import fitted_context
from services.rollout.vllm_worker import BUSY_WAIT_ENV

log = logging.getLogger("rpo.rollout")

WORKER_EXTENSION = "services.rollout.vllm_worker.RpoWorkerExtension"
CPU_MAX_BATCHED_TOKENS = 8192
"""Tokens one engine step may schedule on CPU (prompts are prefilled whole there; see `engine_args`)."""
SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64"}
"""torch dtype name -> safetensors dtype code."""


@dataclass(frozen=True)
class Generated:
    """One sample of one prompt."""

    token_ids: list[int]
    logprobs: list[float]
    """Sampling log-prob of each token (after temperature / top-p), aligned with token_ids."""
    finish_reason: str
    """`stop` (EOS / stop token, the last id) or `length` (hit max_tokens)."""


def served_dtype(cfg: RunConfig, on_cpu: bool) -> str:
    """`model.dtype` with `auto` resolved: float32 on CPU, bfloat16 on GPU."""
    if cfg.model.dtype != "auto":
        return cfg.model.dtype
    return "float32" if on_cpu else "bfloat16"


def engine_environment(cfg: RunConfig, on_cpu: bool) -> dict[str, str]:
    """Variables vLLM's engine processes read at start: the busy-wait window of their message queues
    (`services.rollout.vllm_worker.shorten_busy_waits`) and, on CPU, the cores the worker binds."""
    env = {BUSY_WAIT_ENV: repr(cfg.rollout.engine_busy_wait_seconds)}
    if on_cpu:
        bind = cfg.rollout.cpu_threads_bind
        if bind == "all":
            cores = sorted(os.sched_getaffinity(0))
            bind = ",".join(str(c) for c in cores)
            env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
        env["VLLM_CPU_OMP_THREADS_BIND"] = bind
    return env


def tensor_parallel_size(cfg: RunConfig, on_cpu: bool, gpu_devices: int | None = None) -> int:
    """How many GPUs the replica's engine shards the model over (vLLM's `tensor_parallel_size`).

    On GPU: the `gpu_devices` the replica's claim gave it (`services.core.gpu_claims`; one when it shares
    the trainer's GPU), else `gpus.per_replica` (no claims: the process uses the GPUs it sees). On CPU: 1,
    since no GPUs are claimed there and `gpus.per_replica` does not apply."""
    if on_cpu:
        return 1
    size = cfg.gpus.per_replica if gpu_devices is None else gpu_devices
    if size < 1:
        raise ValueError(f"a rollout replica on GPU needs at least one GPU; its claim gave it {size}")
    return size


def engine_args(cfg: RunConfig, model_dir: Path, on_cpu: bool, gpu_devices: int | None = None) -> Any:
    """vLLM's `AsyncEngineArgs` for a replica."""
    # lazy: heavy import (vllm), paid only on this path
    from vllm.engine.arg_utils import AsyncEngineArgs

    return AsyncEngineArgs(**engine_kwargs(cfg, model_dir, on_cpu, gpu_devices))


def engine_kwargs(
    cfg: RunConfig, model_dir: Path, on_cpu: bool, gpu_devices: int | None = None
) -> dict[str, Any]:
    """The engine settings of a replica, as keyword arguments of vLLM's engine args (or of `vllm.LLM`);
    `gpu_devices`: how many GPUs the replica claimed (None: no claim, see `tensor_parallel_size`)."""
    r = cfg.rollout
    context, _ = fitted_context(cfg, model_dir)
    kwargs: dict[str, Any] = {
        "model": str(model_dir),
        "tensor_parallel_size": tensor_parallel_size(cfg, on_cpu, gpu_devices),
        "dtype": served_dtype(cfg, on_cpu),
        "max_model_len": context,
        "max_num_seqs": r.max_num_seqs,
        "enforce_eager": True if on_cpu else r.enforce_eager,
        "seed": r.engine_seed,
        "logprobs_mode": "processed_logprobs",
        "worker_extension_cls": WORKER_EXTENSION,
        "disable_log_stats": False,
        "trust_remote_code": cfg.model.trust_remote_code,
    }
    if on_cpu:
        kwargs["kv_cache_memory_bytes"] = r.kv_cache_bytes
        # A seeded request whose prompt is prefilled in chunks makes vLLM rewind its torch.Generator with
        # set_offset (`_bookkeeping_sync` in vllm/v1/worker/gpu_model_runner.py, "relies on cuda-specific
        # torch-internal impl details", vLLM PR #10097); CPU generators have no offset, the engine core dies
        # ("CPU Generator does not use offset"). Every rollout is seeded, so prompts are prefilled whole.
        kwargs["enable_chunked_prefill"] = False
        kwargs["max_num_batched_tokens"] = max(context, CPU_MAX_BATCHED_TOKENS)
    else:
        kwargs["gpu_memory_utilization"] = r.gpu_memory_utilization
    if r.sleep_mode:  # the engine frees its GPU memory while the learner steps (`RolloutEngine.sleep`)
        check_sleep_mode(cfg, available=not on_cpu)
        kwargs["enable_sleep_mode"] = True
    if cfg.train.lora.enabled:  # the base is loaded once; each push brings an adapter (`load_adapter`)
        kwargs.update(enable_lora=True, max_loras=1, max_cpu_loras=2, max_lora_rank=lora_rank_slot(cfg))
    if r.weight_transfer == "nccl":
        if kwargs["tensor_parallel_size"] > 1:
            # the trainer's NCCL group gives each replica one rank (trainer/weights/nccl.py)
            raise ValueError(
                f"rollout.weight_transfer=nccl takes one GPU per replica, and this replica's engine spans "
                f"{kwargs['tensor_parallel_size']} (gpus.per_replica); use rollout.weight_transfer=http"
            )
        kwargs["weight_transfer_config"] = {"backend": "nccl"}
    return kwargs


def check_sleep_mode(cfg: RunConfig, available: bool | None = None) -> None:
    """Refuse `rollout.sleep_mode` where vLLM has no sleep mode (its CPU platform has none), in one
    ConfigError naming the setting; `available`: vLLM's own answer when None (imports vLLM only then)."""
    if not cfg.rollout.sleep_mode:
        return
    if available is None:
        # lazy: heavy import (vllm), paid only with rollout.sleep_mode on
        from vllm.platforms import current_platform

        available = current_platform.is_sleep_mode_available()
    if not available:
        raise ConfigError(
            "rollout.sleep_mode: vLLM's sleep mode needs a GPU and this replica runs on CPU (vLLM's CPU platform "
            "has no sleep mode); leave rollout.sleep_mode off here (it frees a GPU the trainer shares)"
        )


def lora_rank_slot(cfg: RunConfig) -> int:
    """vLLM's `max_lora_rank` for `train.lora.rank`: the smallest size vLLM offers that holds it."""
    # lazy: heavy import (vllm), paid only on this path
    from vllm.config.lora import MaxLoRARanks

    return min(size for size in get_args(MaxLoRARanks) if size >= cfg.train.lora.rank)


def _is_validation_error(exc: BaseException) -> bool:
    # lazy: heavy import (vllm), paid only on this path
    from vllm.exceptions import VLLMValidationError

    return isinstance(exc, VLLMValidationError | ValueError)


class RolloutEngine:
    """One vLLM engine (API side in this process, engine core in a child process)."""

    def __init__(self, llm: Any, on_cpu: bool, dtype: str):
        self.llm = llm
        self.on_cpu = on_cpu
        self.dtype = dtype
        model_config = llm.model_config
        self.max_model_len: int = int(model_config.max_model_len)
        self.vocab_size: int = int(model_config.get_vocab_size())
        self.tokenizer = llm.get_tokenizer()
        self.adapter: Any = None
        """The LoRA adapter every new request runs with (vLLM's `LoRARequest`); None: the base alone."""
        self.sleep_level = 0
        """vLLM's sleep level the engine is at (`rollout.sleep_mode`); 0: awake."""

    @classmethod
    def start(cls, cfg: RunConfig, model_dir: Path, gpu_devices: int | None = None) -> RolloutEngine:
        """Load the model (seconds to minutes; spawns the engine core process); `gpu_devices`: how many
        GPUs the replica claimed (None: no claim)."""
        # lazy: heavy import (vllm), paid only on this path
        from vllm.platforms import current_platform

        # lazy: heavy import (vllm), paid only on this path
        from vllm.v1.engine.async_llm import AsyncLLM

        on_cpu = current_platform.is_cpu()
        os.environ.update(engine_environment(cfg, on_cpu))  # the engine processes inherit it
        args = engine_args(cfg, model_dir, on_cpu, gpu_devices)
        llm = AsyncLLM.from_engine_args(args)
        return cls(llm, on_cpu, args.dtype)

    @property
    def safetensors_dtype(self) -> str:
        return SAFETENSORS_DTYPES[self.dtype]

    @property
    def dead(self) -> bool:
        return bool(self.llm.errored)

    async def generate(
        self,
        prompt_ids: list[int],
        *,
        n: int,
        max_tokens: int,
        temperature: float,
        top_p: float,
        seed: int | None,
        policy_version: int,
        top_k: int = 0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
    ) -> list[Generated]:
        """n samples of one prompt (already checked against the vocabulary and the context). `top_k`, `min_p`
        and `repetition_penalty` are vLLM's (defaults: off); the log-probs are then those after them.

        KV blocks are salted with the policy version, so a cached prefix computed with other weights is
        never reused (on top of the prefix-cache reset after each weight load). Greedy decoding (temperature
        0) with n > 1 is n requests of one sample (vLLM takes n = 1 only).
        """
        salt = f"policy-v{policy_version}"
        extra = {"top_k": top_k, "min_p": min_p, "repetition_penalty": repetition_penalty}
        if temperature == 0.0 and n > 1:
            groups = await asyncio.gather(
                *(
                    self._request(prompt_ids, 1, max_tokens, temperature, top_p, seed, salt, extra)
                    for _ in range(n)
                )
            )
            return [sample for group in groups for sample in group]
        return await self._request(prompt_ids, n, max_tokens, temperature, top_p, seed, salt, extra)

    async def _request(
        self,
        prompt_ids: list[int],
        n: int,
        max_tokens: int,
        temperature: float,
        top_p: float,
        seed: int | None,
        salt: str,
        extra: dict[str, float] | None = None,
    ) -> list[Generated]:
        # lazy: heavy import (vllm), paid only on this path
        from vllm import SamplingParams

        # lazy: heavy import (vllm), paid only on this path
        from vllm.inputs import tokens_input

        # lazy: heavy import (vllm), paid only on this path
        from vllm.sampling_params import RequestOutputKind

        self.check_awake("generate")
        final = None
        try:
            params = SamplingParams(
                n=n,
                max_tokens=max_tokens,
                temperature=temperature,
                top_p=top_p,
                seed=seed,
                **(extra or {}),
                logprobs=0,
                detokenize=False,
                output_kind=RequestOutputKind.FINAL_ONLY,  # one output holding all n samples, none streamed
            )
            prompt = tokens_input(prompt_ids, cache_salt=salt)
            adapter = self.adapter
            async for output in self.llm.generate(prompt, params, uuid.uuid4().hex, lora_request=adapter):
                final = output
        except Exception as exc:
            if _is_validation_error(exc):
                raise InvalidInput(f"the engine refused the request: {exc}") from None
            log.exception("engine failed a request")
            raise Unavailable(
                f"the engine failed: {type(exc).__name__}: {exc}", retry_after_seconds=5
            ) from None
        if final is None or len(final.outputs) != n:
            got = 0 if final is None else len(final.outputs)
            raise Unavailable(f"the engine returned {got} samples, not {n}", retry_after_seconds=5)
        samples = []
        for completion in sorted(final.outputs, key=lambda c: c.index):
            ids = list(completion.token_ids)
            entries = completion.logprobs or []
            logprobs = [
                float(entry[token].logprob) if token in entry else float("nan")
                for token, entry in zip(ids, entries, strict=False)
            ]
            samples.append(Generated(ids, logprobs, completion.finish_reason or "length"))
        return samples

    async def load_weights(self, paths: list[str]) -> int:
        """Load checked safetensors files in place (callers hold generation off); returns tensors loaded."""
        self.check_awake("load weights")
        results = await self.llm.collective_rpc("rpo_load_weights", args=(paths,))
        return int(min(results)) if results else 0

    async def load_adapter(self, version: int, directory: str) -> None:
        """Serve the LoRA adapter in `directory` (PEFT's layout) as `version` from the next request on, and
        drop the one served before (callers hold generation off, so no request still runs with it)."""
        # lazy: heavy import (vllm), paid only on this path
        from vllm.lora.request import LoRARequest

        self.check_awake("load an adapter")
        adapter = LoRARequest(f"policy-v{version}", version, directory)
        if not await self.llm.add_lora(adapter):
            raise RuntimeError(f"vLLM did not load the adapter in {directory}")
        previous, self.adapter = self.adapter, adapter
        if previous is not None:
            await self.llm.remove_lora(previous.lora_int_id)

    async def reset_prefix_cache(self) -> None:
        """Drop cached KV blocks, so no prefix computed with the old weights is reused."""
        ok = await self.llm.reset_prefix_cache()
        if not ok:
            log.warning("vLLM did not reset its prefix cache (requests still running?)")

    async def check_health(self) -> None:
        try:
            await self.llm.check_health()
        except Exception as exc:
            raise Unavailable(
                f"the engine is not healthy: {type(exc).__name__}: {exc}", retry_after_seconds=5
            ) from None

    # -- Sleep mode (rollout.sleep_mode; GPU only) -----------------------------------------------------
    async def sleep(self, level: int) -> float:
        """Free the engine's GPU memory (vLLM's sleep at `level`; requests still running are aborted);
        returns the seconds it took, 0 when already asleep."""
        if self.sleep_level:
            return 0.0
        started = time.perf_counter()
        await self.llm.sleep(level=level)
        self.sleep_level = level
        return time.perf_counter() - started

    async def wake(self) -> float:
        """Take the GPU memory back (weights, then the KV cache) and serve again; a new prefix cache (vLLM
        starts it empty). Returns the seconds it took, 0 when already awake."""
        if not self.sleep_level:
            return 0.0
        started = time.perf_counter()
        await self.llm.wake_up()
        self.sleep_level = 0
        return time.perf_counter() - started

    def check_awake(self, what: str) -> None:
        if self.sleep_level:
            raise Conflict(f"cannot {what}: the engine is asleep (POST /v1/engine/wake first)")

    # -- NCCL data plane (vLLM's weight transfer engine; GPU only) ------------------------------------
    async def nccl_init(self, init_info: dict[str, Any]) -> None:
        # lazy: heavy import (vllm), paid only on this path
        from vllm.distributed.weight_transfer.base import WeightTransferInitRequest

        await self.llm.init_weight_transfer_engine(WeightTransferInitRequest(init_info=init_info))

    async def nccl_start(self) -> None:
        self.check_awake("receive weights")
        await self.llm.start_weight_update()

    async def nccl_update(self, update_info: Any) -> None:
        # lazy: heavy import (vllm), paid only on this path
        from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest

        await self.llm.update_weights(WeightTransferUpdateRequest(update_info=update_info))

    async def nccl_finish(self, version: int) -> None:
        await self.llm.finish_weight_update(str(version))

    def shutdown(self) -> None:
        self.llm.shutdown()
