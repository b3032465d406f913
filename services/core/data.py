"""Questions in, prompts out: loading a training or evaluation set and building the prompt token ids.

Formats: `.jsonl`, `.parquet`, a directory written by `datasets.Dataset.save_to_disk`, or `builtin:arith`
/ `builtin:arith-eval` (the synthetic task). Field names are configurable. A bad row fails with the file,
the line (jsonl) or row (parquet, datasets) and the field; nothing is half-loaded.

Prompts use the tokenizer's chat template when it has one (and `data.use_chat_template`), else the plain
`data.prompt_template`. The same function builds prompts for training, cache initialisation and evaluation,
so a question is always seen the same way.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.core.config import DataSection
from services.core.synthetic import SyntheticTaskConfig, make_split


class DatasetError(ValueError):
    """A dataset cannot be read; the message names the file, the line or row, and the field."""


@dataclass(frozen=True)
class Question:
    id: str
    question: str
    answer: str


def _row_to_question(row: Any, fields: DataSection, where: str) -> Question:
    if not isinstance(row, dict):
        raise DatasetError(f"{where}: expected an object with fields, got {type(row).__name__}")
    values = {}
    for role, name in (
        ("id", fields.id_field),
        ("question", fields.question_field),
        ("answer", fields.answer_field),
    ):
        if name not in row or row[name] is None:
            raise DatasetError(f"{where}: missing field {name!r} ({role})")
        value = row[name]
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise DatasetError(
                f"{where}: field {name!r} must be a string or number, got {type(value).__name__}"
            )
        value = str(value)
        if role != "answer" and not value.strip():
            raise DatasetError(f"{where}: field {name!r} is empty")
        values[role] = value
    return Question(**values)


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                yield f"{path}, line {lineno}", json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{path}, line {lineno}: not valid JSON: {exc.msg}") from None


def _table_rows(rows: Iterable[dict], origin: str) -> Iterator[tuple[str, Any]]:
    for index, row in enumerate(rows):
        yield f"{origin}, row {index}", row


def _synthetic_rows(spec: str, fields: DataSection) -> list[Question]:

    task = SyntheticTaskConfig(
        num_terms=fields.synthetic_num_terms,
        max_digits=fields.synthetic_max_digits,
        train_size=fields.synthetic_train_size,
        eval_size=fields.synthetic_eval_size,
        seed=fields.synthetic_seed,
    )
    split = {"builtin:arith": "train", "builtin:arith-eval": "eval"}.get(spec)
    if split is None:
        raise DatasetError(f"unknown built-in dataset {spec!r}; use builtin:arith or builtin:arith-eval")
    return [Question(id=r["id"], question=r["question"], answer=r["answer"]) for r in make_split(task, split)]


def load_questions(spec: str, fields: DataSection, limit: int | None = None) -> list[Question]:
    """Read every question of a dataset (validated whole before returning); ids must be unique."""
    if spec.startswith("builtin:"):
        questions = _synthetic_rows(spec, fields)
    else:
        path = Path(spec)
        if not path.exists():
            raise DatasetError(f"dataset not found: {path}")
        if path.is_dir():
            try:
                # lazy: heavy import (datasets), paid only on this path
                import datasets

                table = datasets.load_from_disk(str(path))
            except Exception as exc:  # noqa: BLE001 - datasets raises many types for a bad directory
                raise DatasetError(f"{path}: not a saved `datasets` directory: {exc}") from None
            if isinstance(table, datasets.DatasetDict):
                if "train" not in table:
                    raise DatasetError(f"{path}: a DatasetDict needs a 'train' split, has {list(table)}")
                table = table["train"]
            rows = _table_rows(table, str(path))
        elif path.suffix == ".jsonl":
            rows = _jsonl_rows(path)
        elif path.suffix == ".parquet":
            # lazy: heavy import (pyarrow), paid only on this path
            import pyarrow.parquet as pq

            try:
                table = pq.read_table(path).to_pylist()
            except Exception as exc:  # noqa: BLE001 - pyarrow raises many types for a bad file
                raise DatasetError(f"{path}: not a readable parquet file: {exc}") from None
            rows = _table_rows(table, str(path))
        else:
            raise DatasetError(
                f"{path}: unsupported dataset format; use .jsonl, .parquet or a datasets directory"
            )
        questions = []
        seen: dict[str, str] = {}
        for where, row in rows:
            q = _row_to_question(row, fields, where)
            if q.id in seen:
                raise DatasetError(f"{where}: duplicate {fields.id_field!r} {q.id!r} (first at {seen[q.id]})")
            seen[q.id] = where
            questions.append(q)
    if not questions:
        raise DatasetError(f"dataset {spec} has no questions")
    return questions[:limit] if limit else questions


def build_prompt_text(tokenizer: Any, question: str, fields: DataSection) -> str:
    """The prompt as text: chat template (with the generation prompt) when available, else the plain template."""
    if fields.use_chat_template and getattr(tokenizer, "chat_template", None):
        messages = []
        if fields.system_prompt:
            messages.append({"role": "system", "content": fields.system_prompt})
        messages.append({"role": "user", "content": question})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return fields.prompt_template.format(question=question)


def encode_prompt(tokenizer: Any, question: str, fields: DataSection) -> list[int]:
    """Prompt token ids. Special tokens come from the chat template when one is used, else the tokenizer's own."""
    text = build_prompt_text(tokenizer, question, fields)
    templated = fields.use_chat_template and getattr(tokenizer, "chat_template", None)
    return list(tokenizer(text, add_special_tokens=not templated)["input_ids"])
