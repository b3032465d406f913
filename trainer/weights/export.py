"""The learner's weights read out under their HF names: the whole model (with LoRA, the base plus the
adapter's delta, merged), the adapter alone, and the policy written as an HF model directory.

Every function here is collective: every rank calls it, in the same order, and iterates to the end (under
ZeRO-3 each bucket of parameters is all-gathered with `deepspeed.zero.GatheredParameters`). Rank 0 gets CPU
copies it may keep and writes the files; the other ranks only take part in the gathers.
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from services.core.adapter_wire import METADATA_KEY, settings_json, write_adapter_config
from services.core.file_modes import make_readable
from trainer import dist
from trainer.learner import lora
from trainer.weights.shards import ShardWriter, size_buckets
from trainer.weights.transport import WeightPayload

if TYPE_CHECKING:
    from trainer.learner.engine import Learner

ADAPTER_DIR = "adapter"
"""With LoRA: the sub-directory of an exported model that holds the adapter alone."""
_WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5", ".index.json")


def _named_tensors(learner: Learner) -> list[tuple[str, torch.Tensor]]:
    """Parameters (shared ones once: a tied LM head is left out) and persistent buffers, HF names."""
    module = learner.module
    named: list[tuple[str, torch.Tensor]] = list(module.named_parameters())
    for name, buf in module.named_buffers():
        owner_name, _, short = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        if short not in owner._non_persistent_buffers_set:
            named.append((name, buf))
    return named


def named_weights(learner: Learner, bucket_bytes: int = 256 * 2**20) -> Iterator[tuple[str, torch.Tensor]]:
    """Full HF-named weights of the current policy, one tensor at a time (collective under ZeRO-3).

    Contract: EVERY rank calls it and iterates to the end, in lockstep (under ZeRO-3 each bucket of up to
    `bucket_bytes` is all-gathered). On rank 0 each tensor is a CPU copy in the training dtype that the
    caller may keep; on other ranks the same names come with tensors that are only valid until the next item
    (drop them). A rank 0 consumer that stops early leaves the other ranks waiting in a gather: drain it (or
    let it fail everywhere).
    """
    # lazy: heavy import (deepspeed), paid only on this path
    import deepspeed

    main = dist.is_main()
    named = _named_tensors(learner)
    # With LoRA: the base plus the adapter's delta, under the base's names (trainer/learner/lora.py).
    deltas = lora.deltas(learner.module) if learner.lora is not None else None
    for bucket in [named] if learner.stage != 3 else size_buckets(named, bucket_bytes):
        params = [t for _, t in bucket if hasattr(t, "ds_id")]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            items = bucket if deltas is None else list(lora.merged(bucket, deltas))
            for name, tensor in items:
                yield name, (tensor.detach().to("cpu", copy=True) if main else tensor.detach())


def adapter_weights(learner: Learner) -> list[tuple[str, torch.Tensor]]:
    """With LoRA: the adapter's tensors under PEFT's saved names, what each step pushes (rank 0; an empty list
    on the others). Collective under ZeRO-3."""
    if learner.lora is None:
        raise RuntimeError("adapter_weights: this learner trains no adapter (train.lora.rank is 0)")
    return lora.adapter_weights(learner.module, dist.is_main())


class LearnerWeights:
    """The `WeightSource` of a training process: what each push carries, read out of the learner. With LoRA
    the adapter alone, with its settings (the replicas hold the base); else the whole model."""

    def __init__(self, learner: Learner):
        self.learner = learner

    def read(self) -> WeightPayload:
        if self.learner.lora is not None:
            metadata = {METADATA_KEY: settings_json(self.learner.lora)}
            return WeightPayload(adapter_weights(self.learner), adapter_metadata=metadata)
        main = dist.is_main()
        # every rank drains the iterator (the gathers are collective); rank 0 keeps the copies
        return WeightPayload([(name, tensor) for name, tensor in named_weights(self.learner) if main])


def export_hf(learner: Learner, out_dir: str, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write the current policy as an HF model directory (collective; rank 0 writes).

    config.json (dtype = the training dtype), safetensors weights (sharded with an index past
    `max_shard_bytes`), and every other top-level file of the model path except weights and config
    (tokenizer, generation config, chat template, licence); with LoRA, the adapter alone in `adapter/` too.
    """
    main = dist.is_main()
    out = Path(out_dir)
    writer = ShardWriter(out, max_shard_bytes) if main else None
    for name, tensor in named_weights(learner):
        if writer is not None:
            writer.add(name, tensor)
    if writer is not None:
        writer.close()
        config = copy.deepcopy(learner.hf_config)
        config.dtype = learner.dtype
        config.use_cache = True
        config.save_pretrained(out)
        for item in learner.model_path.iterdir():
            if item.is_file() and item.name != "config.json" and not item.name.endswith(_WEIGHT_FILES):
                shutil.copy2(item, out / item.name)
        make_readable(out)  # safetensors writes 0600; replicas may run as another user
    if learner.lora is not None:
        adapter = adapter_weights(learner)  # collective
        if main:
            _write_adapter(learner, out / ADAPTER_DIR, adapter)
    dist.barrier()


def _write_adapter(learner: Learner, directory: Path, adapter: list[tuple[str, torch.Tensor]]) -> None:
    """The adapter as PEFT saves it (adapter_config.json, adapter_model.safetensors): loadable with PEFT or
    vLLM on top of the base model."""
    # lazy: heavy import (safetensors), paid only on this path
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file({name: t.contiguous() for name, t in adapter}, directory / "adapter_model.safetensors")
    write_adapter_config(directory, learner.lora, str(learner.model_path))
    make_readable(directory)
