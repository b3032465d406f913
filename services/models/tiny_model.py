"""A tiny Qwen2 policy made on the spot, for tests and the demo: no download, minutes of CPU at most.

What it guarantees:
- `build_tiny_model` writes a normal HF model directory (config, safetensors, generation config, tokenizer)
  that `AutoModelForCausalLM` / `AutoTokenizer` and vLLM (CPU build included) load. head_dim is 64, the
  smallest vLLM's CPU attention accepts; weights are float32; the same seed gives the same weights.
- The tokenizer is byte-level BPE with no merges over ASCII: one token per character, so
  `decode(encode(text)) == text` for ASCII text (the task's); encoding DROPS any non-ASCII character.
  Ids: 0 pad, 1 bos, 2 eos, then ASCII byte b has id 3 + b. It adds no special token on its own (no bos
  in front), so a prompt's ids are exactly its characters and a length in tokens is one in characters.
- `warm_start` teaches a synthetic arithmetic task (the short `services.core.synthetic` one, or the
  long-reasoning `services.core.synthetic_long` one) by supervised learning on "prompt + solution + eos"
  (loss on the solution tokens only), so RL starts from a policy that is sometimes right.
- Each kind is built once per recipe and kept (`services.models.tiny_model_cache.cached_tiny_model`).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from services.core import synthetic_long
from services.core.file_modes import make_readable
from services.core.synthetic import PROMPT_TEMPLATE, SyntheticTaskConfig, check_answer, make_split
from services.core.synthetic_long import LongTaskConfig

log = logging.getLogger(__name__)

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<|pad|>", "<|bos|>", "<|eos|>"
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
BYTE_OFFSET = 3
"""ASCII byte b (0..127) has token id BYTE_OFFSET + b."""
VOCAB_SIZE = BYTE_OFFSET + 128
MAX_POSITIONS = 2048

KINDS = ("warm", "warm-long", "warm-long-var", "random-tied", "random-untied")
WARM_LAYERS = 4
"""The warm-started model is deeper than the random ones: 4 layers learn the task much faster than 2."""
RANDOM_INIT_STD = 0.2
"""Init scale of the cached random kinds (see `build_tiny_model`)."""
WARM_STEPS = 1200
"""Default warm-start length: 1,200 steps of 16 examples, about 3.5 minutes on a 2-core CPU. It leaves the
policy mostly right (78-82% greedy on 200 held-out questions, by build) and sharp enough that RL improves
it: a model stopped at 800 steps (58% greedy, but flatter: 51% when sampled at T = 0.6) lost accuracy under
every RL learning rate we tried, while this one gained 4.5-4.7 points of pass@1 in the default `rpo run`."""
WARM_BATCH_SIZE = 16
WARM_LR = 1e-3
"""Small batches at this learning rate cross the task's accuracy cliff on the fewest examples: 800 steps of
16 at 1e-3 reach the greedy accuracy (58%) of the earlier recipe, 600 steps of 64 at 2e-3, with a third of
the examples and 40% of the time; with 16 per step, 2e-3 and 5e-4 both stayed below 10% after 600 steps."""
WARM_LONG_STEPS = 900
"""Warm start on the long-reasoning task (`services.core.synthetic_long`) at a constant rate: answers of about
320 tokens (470 with a redo), batches grouped by length. Chosen on the validation split with one 900-step
probe whose checkpoints are exactly the shorter builds (2026-12-05, 2-core AMD EPYC; 64 validation
questions, one sample each, pass@1 at T = 0.6 / T = 1.0): 600 steps 5% / 3%, 700 steps 30% / 23%, 800
steps 34% / 19%, 900 steps 75% / 52%; the 1,200-step cosine recipe solved 100% at T = 0.6, leaving RL
nothing to show. 900 steps leave room at both evaluation temperatures. The task has a sharp cliff, so a
build on another CPU model may land elsewhere on it (warm_start.json records the build's greedy accuracy)."""
WARM_LONG_VAR_STEPS = 900
"""Warm start on the long task's varied wording (`LongTaskConfig(wording="varied")`), the recipe of
`WARM_LONG_STEPS` otherwise. Chosen on the validation split for a starting pass@1 near 60% at T = 0.6, from
one 1,100-step probe whose checkpoints are the shorter builds (`bench/warm_probe.py`, record
docs/records/warm-probe-var-2026-12-07.json; 2-core AMD EPYC; 64 validation questions, one sample each, pass@1
at T = 0.6 / T = 1.0): 700 steps 27% / 9%, 800 steps 39% / 30%, 900 steps 67% / 28%, 1,000 steps 66% / 48%,
1,100 steps 48% / 27%. 900 steps, the full wording's count, leaves the two tasks one property apart."""
WARM_LOG_EVERY = 200
"""Warm-start steps between log lines when no progress bar is drawn (stderr not a terminal)."""


def _byte_symbols() -> dict[int, str]:
    """The reversible byte -> printable character map of byte-level BPE (printable bytes map to themselves)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {b: chr(b) for b in keep}
    shift = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shift)
            shift += 1
    return table


def build_tokenizer() -> Any:
    """A byte-level BPE tokenizer with no merges over the 128 ASCII bytes: one token per character.

    It is a `Qwen2Tokenizer` because transformers 5 rebuilds any qwen2 model's tokenizer as one (byte-level
    pre-tokenizer and decoder, NFC, no unknown token) from the vocabulary and merges it finds, whatever
    `tokenizer.json` says; made this way, what is saved and what every loader (vLLM included) rebuilds are
    the same tokenizer. ASCII only, so each id decodes to a whole character on its own and a streaming
    detokenizer (vLLM's) gives the same text as decoding all ids at once, even for a random model.
    """
    # lazy: heavy import (transformers), paid only on this path
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    symbols = _byte_symbols()
    vocab = {PAD_TOKEN: PAD_ID, BOS_TOKEN: BOS_ID, EOS_TOKEN: EOS_ID}
    vocab.update({symbols[b]: BYTE_OFFSET + b for b in range(128)})
    return Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        unk_token=None,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=MAX_POSITIONS,
    )


def _model_config(
    *, tie_word_embeddings: bool, num_layers: int, hidden_size: int, intermediate_size: int, init_std: float
) -> Any:
    # lazy: heavy import (transformers), paid only on this path
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=hidden_size // 64,
        num_key_value_heads=hidden_size // 64,
        head_dim=64,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        use_sliding_window=False,
        initializer_range=init_std,
        dtype="float32",
    )


def build_tiny_model(
    out_dir: str | Path,
    *,
    tie_word_embeddings: bool = True,
    num_layers: int = 2,
    seed: int = 0,
    task: SyntheticTaskConfig | None = None,
    hidden_size: int = 128,
    intermediate_size: int = 384,
    init_std: float = 0.02,
) -> Path:
    """Write a randomly initialised tiny Qwen2 + tokenizer to `out_dir` (an HF model directory).

    `task`, when given, is only checked: its longest example must fit the context window. `init_std` is
    the weights' normal init scale: 0.02 (the usual) trains well, while a larger one (the cached random
    kinds use `RANDOM_INIT_STD`) makes an untrained model's greedy output varied instead of one repeated
    character, which is what a parity test between two engines needs to mean something.
    """
    # lazy: heavy import (torch), paid only on this path
    import torch

    # lazy: heavy import (transformers), paid only on this path
    from transformers import GenerationConfig, Qwen2ForCausalLM

    if hidden_size % 64:
        raise ValueError(f"hidden_size must be a multiple of 64 (head_dim 64), got {hidden_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if task is not None:
        longest = max(
            len(PROMPT_TEMPLATE.format(question=r["question"]) + r["solution"]) + 1
            for r in task_rows(task, "eval")[:50]
        )
        if 2 * longest > MAX_POSITIONS:
            raise ValueError(f"task examples of ~{longest} tokens do not fit a {MAX_POSITIONS}-token window")
    config = _model_config(
        tie_word_embeddings=tie_word_embeddings,
        num_layers=num_layers,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        init_std=init_std,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    model.save_pretrained(out)
    build_tokenizer().save_pretrained(out)
    make_readable(out)
    return out


TaskConfig = SyntheticTaskConfig | LongTaskConfig


def task_rows(task: TaskConfig, split: str) -> list[dict]:
    """A task's rows; the long task's train rows carry the warm start's injected errors."""
    if isinstance(task, LongTaskConfig):
        return (
            synthetic_long.warm_start_rows(task)
            if split == "train"
            else synthetic_long.make_split(task, split)
        )
    return make_split(task, split)


def _encode_examples(tokenizer: Any, rows: list[dict]) -> tuple[Any, Any]:
    """Right-padded input ids and labels (-100 on prompt and padding) of "prompt + solution + eos"."""
    # lazy: heavy import (torch), paid only on this path
    import torch

    seqs, label_seqs = [], []
    for row in rows:
        prompt = tokenizer(PROMPT_TEMPLATE.format(question=row["question"]))["input_ids"]
        answer = tokenizer(row["solution"], add_special_tokens=False)["input_ids"] + [EOS_ID]
        seqs.append(prompt + answer)
        label_seqs.append([-100] * len(prompt) + answer)
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), PAD_ID, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for i, (s, lab) in enumerate(zip(seqs, label_seqs, strict=True)):
        ids[i, : len(s)] = torch.tensor(s)
        labels[i, : len(lab)] = torch.tensor(lab)
    return ids, labels


def greedy_accuracy(model: Any, tokenizer: Any, rows: list[dict], batch_size: int = 64) -> float:
    """Share of `rows` whose greedy completion (plain prompt template) passes `check_answer`."""
    # lazy: heavy import (torch), paid only on this path
    import torch

    if not rows:
        return 0.0
    # Room for a longer answer than the reference (the long task's redo), not only for the reference.
    max_new = int(1.6 * max(len(tokenizer(r["solution"])["input_ids"]) for r in rows)) + 8
    correct = 0.0
    was_training = model.training
    model.eval()
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            prompts = [PROMPT_TEMPLATE.format(question=r["question"]) for r in chunk]
            batch = tokenizer(prompts, return_tensors="pt", padding=True)
            with torch.no_grad():
                out = model.generate(
                    **batch,
                    do_sample=False,
                    max_new_tokens=max_new,
                    eos_token_id=EOS_ID,
                    pad_token_id=PAD_ID,
                )
            texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
            correct += sum(check_answer(t, r["answer"]) for t, r in zip(texts, chunk, strict=True))
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)
    return correct / len(rows)


def warm_start(
    model_dir: str | Path,
    out_dir: str | Path,
    *,
    task_cfg: TaskConfig,
    max_seconds: float = 240.0,
    steps: int = WARM_STEPS,
    batch_size: int = WARM_BATCH_SIZE,
    lr: float = WARM_LR,
    seed: int = 0,
    progress: bool = True,
    eval_questions: int = 200,
    group_by_length: bool = False,
    schedule: str = "cosine",
    on_step: Any = None,
) -> dict:
    """Supervised warm start on the task's train split; saves the model and tokenizer to `out_dir`.

    Stops after `steps` optimizer steps or `max_seconds`, whichever comes first (the step count keeps
    results reproducible; the time cap keeps a slow machine from hanging). `group_by_length` batches rows of
    like length together (less padding: the long task's redo traces are half again as long as the others). AdamW with a short linear
    warm-up and cosine decay. Returns metrics: steps, seconds, first and last loss, greedy accuracy on
    the first `eval_questions` held-out questions.
    """
    # lazy: heavy import (torch), paid only on this path
    import torch

    # lazy: heavy import (transformers), paid only on this path
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    ids, labels = _encode_examples(tokenizer, task_rows(task_cfg, "train"))
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, min(50, steps // 10))

    if schedule not in ("cosine", "constant"):
        raise ValueError(f"schedule must be 'cosine' or 'constant', got {schedule!r}")

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)

    lengths = (ids != PAD_ID).sum(dim=1)

    def batches() -> Iterator[Any]:
        while True:
            order = torch.randperm(len(ids), generator=gen)
            if group_by_length:
                # Within each window of 8 batches, rows of like length share a batch (little padding).
                chunks = []
                for begin in range(0, len(order), 8 * batch_size):
                    window = order[begin : begin + 8 * batch_size]
                    window = window[torch.argsort(lengths[window], stable=True)]
                    chunks += [
                        window[i : i + batch_size] for i in range(0, len(window) - batch_size + 1, batch_size)
                    ]
                for index in torch.randperm(len(chunks), generator=gen).tolist():
                    yield chunks[index]
                continue
            for start in range(0, len(order) - batch_size + 1, batch_size):
                yield order[start : start + batch_size]
            if len(order) < batch_size:
                yield order

    losses: list[float] = []
    done = 0

    def recent_loss() -> float:
        """Mean of the last 20 steps' losses: what the bar, the log lines and `final_loss` report."""
        tail = losses[-20:] or [float("nan")]
        return sum(tail) / len(tail)

    # A bar on a terminal; elsewhere (CI, `rpo run` logs) a log line every WARM_LOG_EVERY steps instead,
    # since a redrawn bar written to a file is one line of a thousand carriage returns.
    with tqdm(total=steps, desc="warm start", unit="step", disable=None if progress else True) as bar:
        for index in batches():
            if done >= steps or time.monotonic() - started > max_seconds:
                break
            x, y = ids[index], labels[index]
            width = int((x != PAD_ID).sum(dim=1).max())
            x, y = x[:, :width], y[:, :width]
            loss = model(input_ids=x, attention_mask=(x != PAD_ID).long(), labels=y).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            done += 1
            bar.update(1)
            if on_step is not None:
                on_step(done, model)
            if done % 20 == 0:
                bar.set_postfix(loss=f"{recent_loss():.3f}")
            if progress and bar.disable and (done % WARM_LOG_EVERY == 0 or done == steps):
                rate = done / (time.monotonic() - started)
                log.info("warm start step %d/%d loss %.3f (%.1f steps/s)", done, steps, recent_loss(), rate)
    train_seconds = time.monotonic() - started
    # The long task's choices (the warm start's length among them) are made on its validation split.
    held_out = "val" if isinstance(task_cfg, LongTaskConfig) else "eval"
    eval_rows = task_rows(task_cfg, held_out)[:eval_questions]
    accuracy = greedy_accuracy(model, tokenizer, eval_rows)
    metrics = {
        "steps": done,
        "train_seconds": round(train_seconds, 2),
        "seconds": round(time.monotonic() - started, 2),
        "first_loss": losses[0] if losses else float("nan"),
        "final_loss": recent_loss(),
        "eval_accuracy": accuracy,
        "eval_questions": len(eval_rows),
        "task": {"kind": type(task_cfg).__name__, **asdict(task_cfg)},
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "warm_start.json").write_text(json.dumps(metrics, indent=2) + "\n")
    make_readable(out)
    log.info(
        "warm start: %d steps in %.1f s, loss %.3f -> %.3f, greedy accuracy %.1f%% on %d held-out questions",
        done,
        train_seconds,
        metrics["first_loss"],
        metrics["final_loss"],
        100 * accuracy,
        len(eval_rows),
    )
    return metrics
