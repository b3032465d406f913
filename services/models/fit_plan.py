"""The memory plan of a run (services/core/memory_plan.py) for a model as `model.path` names it: its shape
read from its config.json (a Hub model's alone, downloaded without its weights), the plan's tables as text,
and `plan_or_refuse`, the check `rpo run` and `rpo train` make before they start anything heavy.

Guarantees: a plan that does not fit is one UsageError with the tables, the figures and the settings that
would make it fit (each of them checked by planning again); never a traceback. Estimates are marked `~`.
"""

from __future__ import annotations

import io
import logging
import re
from pathlib import Path

from huggingface_hub import hf_hub_download
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError
from rich.console import Console
from rich.table import Table

from services.core.cli_args import UsageError
from services.core.config import ConfigError, RunConfig
from services.core.memory_plan import ESTIMATES, ROWS, Box, MemoryPlan, gib, plan_memory, with_fixes
from services.core.model_shape import ModelShape, ModelShapeError, read_shape
from services.models.model_path import resolve_model_path

log = logging.getLogger("rpo.plan")

ROW_LABELS = {
    "weights": "weights",
    "gradients": "gradients",
    "optimizer": "optimizer state (AdamW, master copy)",
    "reference": "reference model (GRPO's KL)",
    "activations": "activations (micro-batch)",
    "kv_cache": "KV cache (vLLM)",
    "runtime": "CUDA context, vLLM runtime",
}


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _hub_config(spec: str, revision: str | None) -> Path | None:
    """A Hub model's config.json alone (the plan needs nothing else), from the cache or the Hub; None when
    it cannot be had (the model's own resolution then says why)."""
    try:
        return Path(hf_hub_download(spec, "config.json", revision=revision))
    except (HfHubHTTPError, HFValidationError, LocalEntryNotFoundError, OSError):
        return None


def model_shape(cfg: RunConfig) -> ModelShape:
    """The shape of `model.path`: a config.json file or a model directory as given, a Hub id's config.json
    (downloaded alone), else the model it resolves to (a built-in model)."""
    path, revision = Path(cfg.model.path), getattr(cfg.model, "revision", None)
    try:
        if path.is_file() or (path / "config.json").is_file():
            return read_shape(path)
        if HUB_ID.match(cfg.model.path) and not path.exists():
            config = _hub_config(cfg.model.path, revision)
            if config is not None:
                return read_shape(config)
        return read_shape(resolve_model_path(cfg.model.path, revision))
    except (ModelShapeError, ConfigError) as exc:
        raise UsageError(str(exc) if str(exc).startswith("model.path") else f"model.path: {exc}") from None


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"


def render_plan(plan: MemoryPlan, cfg: RunConfig) -> str:
    """The plan's tables and lines, as text."""
    console = Console(record=True, width=120, file=io.StringIO())
    s, t = plan.shape, cfg.train
    lora = f"LoRA rank {t.lora.rank}" if t.lora.enabled else "full fine-tuning"
    console.print(
        f"model {s.model_type}: {_count(plan.params)} parameters ({_count(plan.trainable)} trained, {lora}), "
        f"{s.layers} layers, {s.kv_heads}/{s.heads} KV/attention heads; ZeRO-{t.zero_stage} on "
        f"{t.num_processes} rank(s), micro-batch {t.micro_batch_size}, {plan.context}-token context; "
        f"box: {plan.box.gpus} GPU(s) of {gib(plan.box.memory_bytes)}"
    )
    table = Table(title="per process, on each of its GPUs (~ estimate)")
    table.add_column("")
    for p in plan.processes:
        table.add_column(f"{p.name} (GPU {','.join(map(str, p.gpus))})", justify="right")
    for row in ROWS:
        if any(p.gpu[row] for p in plan.processes):
            mark = "~ " if row in ESTIMATES else ""
            table.add_row(mark + ROW_LABELS[row], *(gib(p.gpu[row]) for p in plan.processes))
    table.add_section()
    table.add_row("total on GPU", *(gib(p.total) for p in plan.processes))
    if any(p.host_bytes for p in plan.processes):
        table.add_row("offloaded to host memory", *(gib(p.host_bytes) for p in plan.processes))
    console.print(table)
    gpus = Table(title="per GPU")
    for name in ("GPU", "processes", "needs", "headroom", "of", "fits"):
        gpus.add_column(name, justify="left" if name == "processes" else "right")
    for g in plan.gpus:
        gpus.add_row(
            str(g.index),
            "; ".join(g.processes),
            gib(g.used),
            gib(g.headroom),
            gib(g.capacity),
            "yes" if g.fits else "NO",
        )
    console.print(gpus)
    if plan.rollout_memory_utilization:  # None: no replica on these GPUs; 0: it does not fit
        split = f"rollout.gpu_memory_utilization {plan.rollout_memory_utilization}"
        if plan.trainer_memory_fraction is not None:
            split += f", the trainer capped at {plan.trainer_memory_fraction} of GPU 0"
        console.print(f"vLLM: {split}; its KV cache holds {plan.kv_sequences:.0f} full-length sequences")
    for note in plan.notes:
        console.print(f"note: {note}")
    return console.export_text()


def refusal(plan: MemoryPlan) -> str:
    """The one message of a plan that does not fit: why, then what would make it fit."""
    none = (
        "none of LoRA, offload, sleep mode or a smaller micro-batch does: use more or larger GPUs "
        "(rpo plan --gpus N --gpu-memory SIZE plans for them)"
    )
    fixes = "; ".join(plan.fixes) if plan.fixes else none
    return f"the run does not fit: {'; '.join(plan.problems)}. Settings that would make it fit: {fixes}"


def make_plan(cfg: RunConfig, box: Box, replicas: int = 1, prompt_tokens: int | None = None) -> MemoryPlan:
    plan = plan_memory(model_shape(cfg), cfg, box, replicas, prompt_tokens)
    return with_fixes(plan, cfg, replicas, prompt_tokens)


def plan_or_refuse(cfg: RunConfig, box: Box | None) -> MemoryPlan | None:
    """The preflight of `rpo run` and `rpo train`: None on a machine without a GPU (the plan is for GPUs;
    on CPU nothing is checked and a debug line says so); else the plan, logged, or a UsageError with the
    tables and the refusal when it does not fit."""
    if box is None:
        log.debug("no GPU: the memory plan is skipped (`rpo plan --gpus N --gpu-memory SIZE` plans for one)")
        return None
    plan = make_plan(cfg, box)
    if not plan.fits:
        raise UsageError(render_plan(plan, cfg) + refusal(plan))
    log.info(
        "memory plan: fits %d GPU(s) of %s; GPU 0 needs %s%s",
        box.gpus,
        gib(box.memory_bytes),
        gib(plan.gpus[0].used + plan.gpus[0].headroom),
        ""
        if plan.rollout_memory_utilization is None
        else f", vLLM at rollout.gpu_memory_utilization {plan.rollout_memory_utilization}",
    )
    return plan
