"""Questions in, prompts out: loading a training or evaluation set and building the prompt token ids.

Sources: files, folders and Hugging Face Hub ids at a subset and split (`services.core.data_sources`; which
one each role of a run reads: `services.core.data_roles`), or a built-in synthetic task: `builtin:arith` / `builtin:arith-eval` (short sums) and `builtin:arith-long` /
`builtin:arith-long-eval` (long reasoning with a check and a redo, `services.core.synthetic_long`; its
validation split is `builtin:arith-long-val`; `builtin:arith-long-var*` is the same task whose correct
answers vary in length). Field names are configurable. A bad row fails with the file,
the line (jsonl) or row (parquet, datasets) and the field; nothing is half-loaded.

Files as users have them (GSM8K, OpenR1-style sets) often have no id column and may repeat a question:
- a row without `data.id_field` gets a stable id derived from its question text (`q-` and the first 16 hex
  digits of the SHA-256 of the text, whitespace collapsed), so the same question has the same id in every
  run and the cache finds it again;
- a question whose text (whitespace collapsed) appeared on an earlier row is a repeat: it is dropped, the
  first row kept, and the count reported (`LoadedDataset.repeats_dropped`, logged);
- one id on two rows with different questions is an error naming both rows.

A conversational row holds a list of turns in `data.messages_field` (`{"role": "system"|"user"|"assistant",
"content": ...}`, the last a user turn) instead of a question: its question text is the last user turn, its
derived id and its repeat check cover the whole conversation.

Prompts use the tokenizer's chat template when it has one (and `data.use_chat_template`), else the plain
`data.prompt_template` (a conversation then reads as its system turns, each user turn through the template,
each assistant turn as written). The same function builds prompts for training, cache initialisation and evaluation,
so a question is always seen the same way.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from services.core.config import DataSection
from services.core.data_sources import DatasetError, Rows, Source, source_rows
from services.core.synthetic import SyntheticTaskConfig, make_split
from services.core.synthetic_long import LongTaskConfig
from services.core.synthetic_long import make_split as make_long_split

log = logging.getLogger("rpo.data")


LONG_SPLITS = {
    f"builtin:{task}{suffix}": (wording, split)
    for task, wording in (("arith-long", "full"), ("arith-long-var", "varied"))
    for suffix, split in (("", "train"), ("-val", "val"), ("-eval", "eval"))
}
"""The long task's splits, in both wordings (`services.core.synthetic_long`): dataset -> (wording, split)."""
BUILTIN_DATASETS = ("builtin:arith", "builtin:arith-eval", *LONG_SPLITS)


ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Question:
    id: str
    question: str
    answer: str
    messages: tuple[tuple[str, str], ...] = ()
    """A conversational row's turns, (role, content); empty for a plain question."""
    columns: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    """The row's other fields, as JSON carries them, for batch reward functions (the prompt's field left out)."""

    def prompt_as_given(self) -> str | list[dict[str, str]]:
        """The prompt as the dataset holds it: the conversation's turns, or the question's text (TRL's `prompts`)."""
        if self.messages:
            return [{"role": role, "content": content} for role, content in self.messages]
        return self.question

    def key_text(self) -> str:
        """What the repeat check and a derived id compare: the question, or the whole conversation."""
        if not self.messages:
            return _normalised(self.question)
        return _normalised(json.dumps([list(turn) for turn in self.messages], ensure_ascii=False))


@dataclass(frozen=True)
class LoadedDataset:
    """A dataset as training reads it, and what loading it did."""

    questions: list[Question]
    rows: int
    """Rows read (before repeats were dropped and `limit` applied)."""
    repeats_dropped: int
    derived_ids: int
    """Rows without an id field, given one derived from the question text."""


def _normalised(text: str) -> str:
    return " ".join(text.split())


def derived_id(question: str) -> str:
    """The id of a question that has none: stable across runs, the same for the same text."""
    return "q-" + hashlib.sha256(_normalised(question).encode("utf-8")).hexdigest()[:16]


def _row_to_question(row: Any, fields: DataSection, where: str) -> tuple[Question, bool]:
    """The row's question, and whether its id was derived (the row has no id field)."""
    if not isinstance(row, dict):
        raise DatasetError(f"{where}: expected an object with fields, got {type(row).__name__}")
    values: dict[str, Any] = {}
    derived = row.get(fields.id_field) is None
    conversational = row.get(fields.messages_field) is not None
    if conversational:
        values["messages"] = _turns(row[fields.messages_field], fields.messages_field, where)
        values["question"] = next(c for r, c in reversed(values["messages"]) if r == "user")
    for role, name in (
        ("id", fields.id_field),
        ("question", fields.question_field),
        ("answer", fields.answer_field),
    ):
        if (role == "id" and derived) or (role == "question" and conversational):
            continue
        if role == "answer" and name is None:  # a prompt-only dataset (data.answer_field: null)
            values["answer"] = ""
            continue
        if name not in row or row[name] is None:
            keys = ", ".join(repr(k) for k in row) or "none"
            raise DatasetError(
                f"{where}: missing field {name!r} ({role}; set data.{role}_field to the column that holds "
                f"it); the row's fields: {keys}"
            )
        value = row[name]
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise DatasetError(
                f"{where}: field {name!r} must be a string or number, got {type(value).__name__}"
            )
        value = str(value)
        if role != "answer" and not value.strip():
            raise DatasetError(f"{where}: field {name!r} is empty")
        values[role] = value
    if derived:
        values["id"] = derived_id(Question(id="", **values).key_text())
    prompt_field = fields.messages_field if conversational else fields.question_field
    values["columns"] = {k: _json_value(v) for k, v in row.items() if k != prompt_field}
    return Question(**values), derived


def _json_value(value: Any) -> Any:
    """A column's value as JSON carries it (a date or bytes from parquet becomes its text)."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return json.loads(json.dumps(value, ensure_ascii=False, default=str))


def _turns(value: Any, name: str, where: str) -> tuple[tuple[str, str], ...]:
    """A conversation's turns, checked: a list of {role, content}, known roles, the last one a user turn."""
    if not isinstance(value, list) or not value:
        raise DatasetError(f"{where}: field {name!r} must be a non-empty list of {{role, content}} turns")
    turns = []
    for n, turn in enumerate(value):
        if (
            not isinstance(turn, dict)
            or not isinstance(turn.get("content"), str)
            or turn.get("role") not in ROLES
        ):
            raise DatasetError(
                f'{where}: {name}[{n}] must be {{"role": one of {", ".join(ROLES)}, "content": text}}, '
                f"got {json.dumps(turn, ensure_ascii=False)[:120]}"
            )
        turns.append((turn["role"], turn["content"]))
    if turns[-1][0] != "user" or not turns[-1][1].strip():
        raise DatasetError(
            f"{where}: the last turn of {name!r} must be a non-empty user turn (the model answers it)"
        )
    return tuple(turns)


def _synthetic_rows(spec: str, fields: DataSection) -> list[Question]:

    task = SyntheticTaskConfig(
        num_terms=fields.synthetic_num_terms,
        max_digits=fields.synthetic_max_digits,
        train_size=fields.synthetic_train_size,
        eval_size=fields.synthetic_eval_size,
        seed=fields.synthetic_seed,
    )
    if spec in LONG_SPLITS:
        wording, split = LONG_SPLITS[spec]
        long_task = LongTaskConfig(seed=fields.synthetic_seed, wording=wording)
        rows = make_long_split(long_task, split)
        return [_builtin_question(r) for r in rows]
    split = {"builtin:arith": "train", "builtin:arith-eval": "eval"}.get(spec)
    if split is None:
        raise DatasetError(f"unknown built-in dataset {spec!r}; use one of {', '.join(BUILTIN_DATASETS)}")
    return [_builtin_question(r) for r in make_split(task, split)]


def _builtin_question(row: dict[str, Any]) -> Question:
    columns = {"id": row["id"], "answer": row["answer"]}
    return Question(id=row["id"], question=row["question"], answer=row["answer"], columns=columns)


def load_questions(spec: str | Source, fields: DataSection, limit: int | None = None) -> list[Question]:
    """Read every question of a dataset (validated whole before returning; repeats dropped, logged)."""
    loaded = load_dataset(spec, fields, limit)
    return loaded.questions


def load_dataset(
    spec: str | Source,
    fields: DataSection,
    limit: int | None = None,
    keep: Callable[[Question], bool] | None = None,
) -> LoadedDataset:
    """Read every row of a dataset (a spec, or a Source with its subset and split), apply the rules of the
    module docstring, keep the questions `keep` accepts (a hold-out), then the first `limit`."""
    source = spec if isinstance(spec, Source) else Source(spec)
    if source.spec.startswith("builtin:"):
        questions = _synthetic_rows(source.spec, fields)
        loaded = LoadedDataset(questions, len(questions), 0, 0)
    else:
        loaded = _read_rows(source_rows(source), fields)
    if loaded.repeats_dropped:
        log.info(
            "%s: dropped %d repeated question(s) of %d rows",
            source.describe(),
            loaded.repeats_dropped,
            loaded.rows,
        )
    questions = [q for q in loaded.questions if keep is None or keep(q)]
    if not questions:
        raise DatasetError(f"dataset {source.describe()} has no questions ({source.setting})")
    return LoadedDataset(
        questions[:limit] if limit else questions, loaded.rows, loaded.repeats_dropped, loaded.derived_ids
    )


def _read_rows(rows: Rows, fields: DataSection) -> LoadedDataset:
    questions: list[Question] = []
    by_id: dict[str, tuple[str, str]] = {}  # id -> (normalised question, where)
    seen_text: set[str] = set()
    count = repeats = derived = 0
    for where, row in rows:
        count += 1
        q, was_derived = _row_to_question(row, fields, where)
        text = q.key_text()
        if q.id in by_id and by_id[q.id][0] != text:
            raise DatasetError(
                f"{where}: {fields.id_field!r} {q.id!r} is also the id of a different question at {by_id[q.id][1]}"
            )
        if text in seen_text or q.id in by_id:
            repeats += 1
            continue
        seen_text.add(text)
        by_id[q.id] = (text, where)
        derived += was_derived
        questions.append(q)
    return LoadedDataset(questions, count, repeats, derived)


def build_prompt_text(tokenizer: Any, question: str | Question, fields: DataSection) -> str:
    """The prompt as text: chat template (with the generation prompt) when available, else the plain template.
    `question`: a Question (a conversational one brings its turns) or a question's text."""
    turns = question.messages if isinstance(question, Question) else ()
    text = question.question if isinstance(question, Question) else question
    if not turns:
        turns = ((("system", fields.system_prompt),) if fields.system_prompt else ()) + (("user", text),)
    elif (
        fields.system_prompt and turns[0][0] != "system"
    ):  # the config's system prompt, unless the row has one
        turns = (("system", fields.system_prompt), *turns)
    if fields.use_chat_template and getattr(tokenizer, "chat_template", None):
        messages = [{"role": role, "content": content} for role, content in turns]
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, **fields.chat_template_kwargs
        )
    if not isinstance(question, Question) or not question.messages:
        return fields.prompt_template.format(question=text)
    plain = {"user": lambda c: fields.prompt_template.format(question=c), "system": "{}\n".format}
    return "".join(plain.get(role, "{}\n".format)(content) for role, content in turns)


def encode_prompt(tokenizer: Any, question: str | Question, fields: DataSection) -> list[int]:
    """Prompt token ids. Special tokens come from the chat template when one is used, else the tokenizer's own.
    A prompt over `data.max_prompt_length` tokens keeps its last ones (TRL's left truncation)."""
    text = build_prompt_text(tokenizer, question, fields)
    templated = fields.use_chat_template and getattr(tokenizer, "chat_template", None)
    ids = list(tokenizer(text, add_special_tokens=not templated)["input_ids"])
    return ids[-fields.max_prompt_length :] if fields.max_prompt_length else ids
