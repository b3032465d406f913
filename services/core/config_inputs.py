"""The sections of a run's configuration that say what is trained on: the model, the data and the reward.
Every field's docstring is its documentation (`docs/configuration.md` is rendered from them). Validators
check; they never rewrite a value. Importable without torch or vLLM.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import (
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from services.core.config_base import ConfigSection, wire_default
from services.core.schemas.rollout import (
    RewardTerm,
    check_correctness,
    check_distinct_names,
    correctness_index,
    weighted_terms,
)


class ModelSection(ConfigSection):
    """The policy being trained (and served by every rollout replica)."""

    path: str = "builtin:tiny-warm"
    """A Hugging Face Hub id (`Qwen/Qwen2.5-0.5B-Instruct`: downloaded into the Hugging Face cache, or read
    from it with HF_HUB_OFFLINE=1), a local HF model directory, or `builtin:tiny-warm` / `builtin:tiny-random`
    for the embedded tiny model."""
    revision: str | None = None
    """The Hub revision of `path` (a branch, tag or commit); None: the default branch. Ignored for a local path."""
    trust_remote_code: bool = False
    """Let transformers and vLLM run the model repository's own Python code (models not built into them)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """`auto`: bfloat16 on GPU, float32 on CPU."""
    max_model_len: int | None = Field(None, ge=16)
    """Context length (prompt + response) the rollout engine is sized for, in tokens. None: the model's own
    context (its config.json's positions), at most `algorithm.max_response_tokens` + 512 for the prompt.
    Longer than the model's context is refused at start."""


class DataSection(ConfigSection):
    """Training and held-out questions, their field names, and how prompts are built."""

    dataset: str = "builtin:arith"
    """Training questions: a Hugging Face Hub dataset id (`openai/gsm8k`), a .jsonl, .json, .csv or .parquet
    file, a folder (a `datasets` save, or parquet/json/csv shards as the Hub lays them out), or a built-in
    task (`builtin:arith`, `builtin:arith-long`)."""
    subset: str | None = None
    """The dataset's subset (its configuration, `load_dataset`'s `name`: `main` for openai/gsm8k); applies
    to every dataset named here that has subsets."""
    split: str = "train"
    """The split training reads (folders and Hub datasets; a single file is one split)."""
    revision: str | None = None
    """The Hub revision of the datasets named by Hub id (a branch, tag or commit); None: the default branch."""
    eval_dataset: str | None = "auto"
    """Held-out questions for evaluation (same sources). `auto`: a built-in task's held-out split; else
    `eval_holdout` of the training rows when it is set; else `dataset`'s `eval_split`; else the run is
    refused with what to set. None (`none`) disables evaluation."""
    eval_split: str = "test"
    """The split evaluation reads."""
    eval_holdout: float = Field(0.0, ge=0.0, lt=1.0)
    """With `eval_dataset: auto`: this share of the training rows (chosen by a hash of each question's id,
    the same rows in every run) is held out of training and evaluated on instead. 0: off."""
    val_dataset: str | None = None
    """Validation questions (same sources). When set, the evaluations during training (`train.eval_every`)
    and a curve point before and after training use them, so the test set (`eval_dataset`) is touched only
    by the evaluations before and after training."""
    val_split: str = "validation"
    """The split validation reads."""
    id_field: str = "id"
    """Field holding a unique question id; rows without it get one derived from the question text."""
    question_field: str = "question"
    """Field holding the question text."""
    answer_field: str | None = "answer"
    """Field holding the reference answer the reward checks against; null: a prompt-only dataset (the
    reference is empty), allowed when no reward function needs one (not `math`, `exact` or `auto`)."""
    messages_field: str = "messages"
    """Field holding a conversation (a list of `{role, content}` turns: system, user, assistant; the last one
    a user turn), used instead of the question field in a row that has it: the prompt is the conversation
    through the chat template (docs/training.md, "Datasets")."""
    prompt_template: str = "Q: {question}\nA: "
    """Plain prompt used when the tokenizer has no chat template (or `use_chat_template` is false)."""
    chat_template_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Extra keyword arguments of the chat template (TRL's `chat_template_kwargs`), e.g. `{enable_thinking:
    false}`."""
    max_prompt_length: int | None = Field(None, ge=1)
    """Prompts longer than this many tokens keep their last ones (TRL's left truncation); null: whole."""
    use_chat_template: bool = True
    """Use the tokenizer's chat template when it has one."""
    system_prompt: str | None = None
    """Optional system message when the chat template is used."""
    max_questions: int | None = Field(None, ge=1)
    """Use only the first N training questions (quick runs)."""
    eval_max_questions: int | None = Field(None, ge=1)
    """Evaluate on only the first N held-out questions."""
    val_max_questions: int | None = Field(None, ge=1)
    """Validate on only the first N validation questions."""
    synthetic_num_terms: int = Field(4, ge=2, le=32)
    """Difficulty of the built-in arithmetic task: terms per question (more terms, longer traces)."""
    synthetic_max_digits: int = Field(2, ge=1, le=6)
    """Digits per term of the built-in task."""
    synthetic_train_size: int = Field(2000, ge=1)
    """Questions in the built-in training split."""
    synthetic_eval_size: int = Field(200, ge=1)
    """Questions in the built-in held-out split (never in training)."""
    synthetic_seed: int = 0
    """Seed of the built-in task; the same seed gives the same questions."""

    @field_validator("eval_dataset", "val_dataset", mode="before")
    @classmethod
    def _none_disables(cls, value: Any) -> Any:
        """`none` on the command line or in the environment means None, as `null` does in YAML."""
        return None if isinstance(value, str) and value.strip().lower() in ("none", "null", "") else value

    @model_validator(mode="after")
    def _holdout_needs_auto(self) -> DataSection:
        if self.eval_holdout > 0 and self.eval_dataset != "auto":
            raise ValueError(
                f"data.eval_holdout ({self.eval_holdout}) holds training rows out for evaluation, which is "
                f"only used with data.eval_dataset: auto, but data.eval_dataset is {self.eval_dataset!r}: "
                "set one or the other"
            )
        return self


def _absolute_file_spec(spec: str) -> str:
    """`rewards.py:f` is relative to where the config is loaded; replicas elsewhere get the absolute path."""
    module, sep, attr = spec.rpartition(":")
    if sep and module.endswith(".py") and not Path(module).is_absolute():
        return f"{Path(module).resolve()}:{attr}"
    return spec


class RewardSection(ConfigSection):
    """The verifiable reward of a whole response."""

    function: str = wire_default("reward")
    """`math` (math-verify on the last \\boxed{}), `exact` (exact string match of the last \\boxed{}),
    `auto` (exact for builtin datasets, math otherwise), `format` (the example format reward), or
    `package.module:function`; used when `functions` is empty."""
    functions: list[RewardTerm] = Field(default_factory=list, max_length=32)
    """Several reward functions, `[{function, weight, name}]`: a response's reward is the weighted sum of their
    scores. Each takes one response, `(response, reference) -> float`, or a batch, TRL-style
    `(completions, **kwargs) -> list[float]` (docs/training.md, "Rewards")."""
    correctness: str | None = wire_default("correctness")
    """Name of the function whose score >= 1 makes a response correct (accuracy, DAPO's filter, the cache's
    `replace_only_correct`); default: the first."""

    @field_validator("functions")
    @classmethod
    def _distinct_names(cls, functions: list[RewardTerm]) -> list[RewardTerm]:
        return check_distinct_names(functions)

    @field_validator("correctness")
    @classmethod
    def _names_a_function(cls, correctness: str | None, info: ValidationInfo) -> str | None:
        return check_correctness(correctness, info.data.get("function"), info.data.get("functions"))

    @model_validator(mode="after")
    def _one_form(self) -> RewardSection:
        if self.functions and self.function != "auto":
            raise ValueError("set reward.function or reward.functions, not both")
        return self

    def wire(self) -> dict[str, Any]:
        """The rollout request's reward fields; a reward file's relative path made absolute from here (the
        trainer's directory), since replicas elsewhere resolve it."""
        functions = [
            t.model_copy(update={"function": _absolute_file_spec(t.function)}) for t in self.functions
        ]
        return {
            "reward": _absolute_file_spec(self.function),
            "rewards": functions,
            "correctness": self.correctness,
        }

    def reward_terms(self) -> list[RewardTerm]:
        """The weighted functions to score with."""
        return weighted_terms(self.function, self.functions)

    def correctness_index(self) -> int:
        return correctness_index(self.reward_terms(), self.correctness)
