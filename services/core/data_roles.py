"""Which rows each role of a run reads: training, evaluation (the test set) and validation.

The rules, from the `data` settings:
- training reads `data.dataset` at `data.split` (and `data.subset`), less the rows held out for evaluation;
- evaluation reads `data.eval_dataset` at `data.eval_split`. Its default, `auto`, keeps a run on the
  user's data evaluating on the user's data: the built-in task's own held-out split for a built-in
  dataset; else, with `data.eval_holdout` > 0, that share of the training rows (chosen by a hash of each
  question's id, so the same rows in every run, and they leave training); else the dataset's
  `data.eval_split` when it has one; else a refusal that names the settings. `none` disables evaluation;
- validation reads `data.val_dataset` at `data.val_split` when it is set.
Guarantees: a run on a user's dataset never evaluates on the built-in synthetic set unless the user names
it; every choice says what it reads (`describe`), and evaluation lines carry that; held-out rows are in
exactly one of training and evaluation.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Literal

from services.core.config import DataSection
from services.core.data import Question, load_dataset
from services.core.data_sources import DatasetError, Source, available_splits

Role = Literal["train", "eval", "val"]

BUILTIN_EVAL = {
    "builtin:arith": "builtin:arith-eval",
    "builtin:arith-long": "builtin:arith-long-eval",
    "builtin:arith-long-var": "builtin:arith-long-var-eval",
}
"""A built-in training set's own held-out split: what `eval_dataset: auto` evaluates a built-in run on."""


@dataclass(frozen=True)
class DatasetChoice:
    """What one role reads: a source, and which side of a hold-out it takes (None: every row)."""

    role: Role
    source: Source
    holdout: Literal["rest", "held_out"] | None = None
    share: float = 0.0

    def describe(self) -> str:
        if self.holdout == "held_out":
            return f"held out from {self.source.describe()} ({self.share:.0%} of its rows, data.eval_holdout)"
        if self.holdout == "rest":
            return f"{self.source.describe()} less {self.share:.0%} held out for evaluation"
        return self.source.describe()

    def keeps(self, question: Question) -> bool:
        if self.holdout is None:
            return True
        return is_held_out(question.id, self.share) == (self.holdout == "held_out")


def is_held_out(question_id: str, share: float) -> bool:
    """Whether a question is in the held-out share: a hash of its id below `share` (stable, order-free)."""
    digest = hashlib.sha256(f"rpo-holdout:{question_id}".encode()).hexdigest()
    return int(digest[:12], 16) / 16**12 < share


def eval_dataset_spec(data: DataSection) -> str | None:
    """The evaluation set's name without reading anything (for reward defaults): `auto` resolved as far as
    the settings alone allow."""
    if data.eval_dataset != "auto":
        return data.eval_dataset
    if data.dataset.startswith("builtin:"):
        return BUILTIN_EVAL.get(data.dataset)
    return data.dataset


def choose_dataset(role: Role, data: DataSection) -> DatasetChoice | None:
    """What `role` reads (the module docstring's rules); None when the role has no dataset. Raises
    DatasetError when `eval_dataset: auto` finds nothing to evaluate on."""
    if role == "train":
        train = DatasetChoice("train", _source(data, data.dataset, data.split, "data.dataset"))
        if data.eval_dataset == "auto" and data.eval_holdout > 0 and not data.dataset.startswith("builtin:"):
            return replace(train, holdout="rest", share=data.eval_holdout)
        return train
    if role == "val":
        if data.val_dataset is None:
            return None
        return DatasetChoice("val", _source(data, data.val_dataset, data.val_split, "data.val_dataset"))
    if data.eval_dataset is None:
        return None
    if data.eval_dataset != "auto":
        return DatasetChoice("eval", _source(data, data.eval_dataset, data.eval_split, "data.eval_dataset"))
    if data.dataset.startswith("builtin:"):
        spec = BUILTIN_EVAL.get(data.dataset)
        return DatasetChoice("eval", Source(spec, setting="data.eval_dataset")) if spec else None
    if data.eval_holdout > 0:
        source = _source(data, data.dataset, data.split, "data.dataset")
        return DatasetChoice("eval", source, holdout="held_out", share=data.eval_holdout)
    source = _source(data, data.dataset, data.eval_split, "data.dataset")
    splits = available_splits(source)
    if splits and data.eval_split in splits:
        return DatasetChoice("eval", source)
    has = f"its splits are {', '.join(splits)}" if splits else "it is one file (one split)"
    raise DatasetError(
        f"nothing to evaluate on: data.eval_dataset is auto and data.dataset {data.dataset!r} has no "
        f"{data.eval_split!r} split (data.eval_split; {has}). Set data.eval_split to one of its splits, "
        "data.eval_holdout (e.g. 0.05 holds out 5% of the training rows), data.eval_dataset (a file, folder "
        "or Hub id; --eval-dataset), or data.eval_dataset=none to train without evaluation"
    )


def _source(data: DataSection, spec: str, split: str, setting: str) -> Source:
    return Source(spec, subset=data.subset, split=split, revision=data.revision, setting=setting)


LIMITS = {"train": "max_questions", "eval": "eval_max_questions", "val": "val_max_questions"}


def load_role(role: Role, data: DataSection) -> tuple[list[Question], DatasetChoice] | None:
    """The questions `role` reads (its `data.*max_questions` applied after the hold-out) and the choice
    behind them; None when the role has no dataset."""
    choice = choose_dataset(role, data)
    if choice is None:
        return None
    limit = getattr(data, LIMITS[role])
    loaded = load_dataset(choice.source, data, limit, keep=choice.keeps)
    return loaded.questions, choice


def training_questions(data: DataSection) -> list[Question]:
    """The training questions (training always has a dataset)."""
    questions, _ = load_role("train", data) or ([], None)
    return questions
