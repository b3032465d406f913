"""Wire schemas of the experience cache service (`/v1/runs/{run_id}/...`), shared by the server
(`cache_server/`) and its clients (the rollout service, the trainer, `rpo cache ...`).

One entry per (run, question): the answer's token ids (WITHOUT a trailing EOS: the rollout service strips
it), the reward and correctness it earned, the policy version that produced it, and `last_group_min_len`,
the shortest response of the question's last group (what L = "0.5l" / "l" is relative to). Lists in a
response are aligned with the lists of the request (results[i] answers question_ids[i] / groups[i]).
Limits that depend on the server's configuration (batch size, tokens per entry) are checked by the server
and reported as 422 naming the field, like the bounds below.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from services.core.schemas.common import (
    MAX_INT64,
    TOKEN_ID_BYTES,
    TokenIds,
    TruncationLimit,
    Version,
    Wire,
    token_count,
)

RUN_ID_PATTERN = r"^[A-Za-z0-9._-]{1,128}$"
"""Run ids name a key namespace: letters, digits, `.`, `_`, `-` (no glob or hash-tag characters)."""

QuestionId = Annotated[str, Field(min_length=1, max_length=512)]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


def _unique(ids: list[str], what: str) -> list[str]:
    seen: set[str] = set()
    for q in ids:
        if q in seen:
            raise ValueError(f"{what} must be unique within one request; {q!r} appears twice")
        seen.add(q)
    return ids


# ---------------------------------------------------------------------------------------------------------
# Entries: bulk put (initialisation, import) and read-back (inspection, export)


class PutEntry(Wire):
    """One entry to write. The metadata fields at the end are for imports; leave them out otherwise."""

    question_id: QuestionId
    token_ids: TokenIds
    """The answer, without a trailing EOS token; at least one token."""
    reward: FiniteFloat = 0.0
    """Reward the answer earned (shaped or raw, as the caller keeps it)."""
    correct: bool = False
    """Whether the answer was verified correct."""
    policy_version: Version = 0
    """Policy version that produced the answer (0: the starting policy)."""
    last_group_min_len: int | None = Field(None, ge=0)
    """Shortest response length (tokens) of the question's last group; None until a group was seen."""
    created_at: FiniteFloat | None = Field(None, ge=0)
    """Import only: original creation time (unix seconds); default now."""
    updated_at: FiniteFloat | None = Field(None, ge=0)
    """Import only: original last update time (unix seconds); default now."""
    update_count: int = Field(0, ge=0)
    """Import only: how many epsilon-greedy updates the entry had seen."""
    last_step: int | None = Field(None, ge=0, le=MAX_INT64)
    """Import only: training step of the last update applied."""

    @field_validator("token_ids")
    @classmethod
    def _non_empty(cls, value: bytes) -> bytes:
        if not value:
            raise ValueError("an entry needs at least one token id")
        return value


class PutEntriesRequest(Wire):
    """Bulk put, applied atomically: every entry is written (or skipped) or none is."""

    entries: list[PutEntry] = Field(min_length=1)
    overwrite: bool = True
    """False keeps existing entries (so `rpo cache init` can resume); True replaces them (import)."""

    @field_validator("entries")
    @classmethod
    def _unique_questions(cls, value: list[PutEntry]) -> list[PutEntry]:
        _unique([e.question_id for e in value], "question ids")
        return value


class PutEntriesResponse(Wire):
    written: int
    """Entries written by this request."""
    skipped_question_ids: list[str]
    """Entries left alone because they existed and `overwrite` was false."""


class CacheEntry(Wire):
    """An entry as stored: what read-back and export return (one NDJSON line of an export)."""

    question_id: str
    token_ids: TokenIds
    """The cached answer (no trailing EOS)."""
    length: int
    """Number of token ids."""
    reward: float
    correct: bool
    policy_version: int
    last_group_min_len: int | None
    """Shortest response of the question's last group, tokens; None until a group was seen."""
    created_at: float
    """Unix seconds when the entry was first written."""
    updated_at: float
    """Unix seconds of the last write."""
    update_count: int
    """Epsilon-greedy updates applied to this entry."""
    last_step: int | None
    """Training step of the last update applied (None: never updated)."""

    @model_validator(mode="after")
    def _length_matches(self) -> CacheEntry:
        if token_count(self.token_ids) != self.length:
            raise ValueError(f"length {self.length} does not match {token_count(self.token_ids)} token ids")
        return self

    def to_put(self) -> PutEntry:
        """The write that recreates this entry as it is (used by import)."""
        return PutEntry(
            question_id=self.question_id,
            token_ids=self.token_ids,
            reward=self.reward,
            correct=self.correct,
            policy_version=self.policy_version,
            last_group_min_len=self.last_group_min_len,
            created_at=self.created_at,
            updated_at=self.updated_at,
            update_count=self.update_count,
            last_step=self.last_step,
        )


class ReadEntriesRequest(Wire):
    question_ids: list[QuestionId] = Field(min_length=1)


class ReadEntriesResponse(Wire):
    entries: list[CacheEntry | None]
    """entries[i] is question_ids[i]'s entry, or null when it has none."""


# ---------------------------------------------------------------------------------------------------------
# Prefix retrieval (docs/algorithm.md, step 2)


class PrefixRequest(Wire):
    """For each question: draw m ~ U{0..L} and return the cached answer minus its last m tokens."""

    question_ids: list[QuestionId] = Field(min_length=1)
    truncation_limit: TruncationLimit
    """L: tokens >= 0, or "0.5l" / "l" (l = the shortest response of the question's last group, else the
    cached answer's length)."""
    seed: int | None = None
    """Makes the draws reproducible: question q's m depends only on (seed, q), not on batch order."""


class PrefixResult(Wire):
    question_id: str
    hit: bool
    """False when the question has no entry: prefix empty, decode a full response (it seeds the cache)."""
    prefix_ids: TokenIds
    """The first answer_len - m tokens of the cached answer (empty on a miss or when m >= answer_len)."""
    m: int
    """Tokens cut from the end of the cached answer (0 on a miss)."""
    limit: int
    """L resolved to tokens for this question (0 on a miss)."""
    answer_len: int
    """Length of the whole cached answer (0 on a miss)."""
    policy_version: int | None
    """Version of the policy that produced the cached answer (None on a miss)."""


class PrefixResponse(Wire):
    results: list[PrefixResult]
    """results[i] answers question_ids[i]."""


# ---------------------------------------------------------------------------------------------------------
# Epsilon-greedy update (docs/algorithm.md, step 6)


class UpdateCandidate(Wire):
    """One response of a group: the group's `prefix_ids` followed by `suffix_ids`."""

    suffix_ids: TokenIds
    """Tokens after the group's shared prefix (the whole response when prefix_ids is empty), no EOS."""
    reward: FiniteFloat
    """Shaped reward of the whole response (what "best" is judged by)."""
    correct: bool
    """Verified correctness of the whole response."""


class GroupUpdate(Wire):
    """The G responses of one question after a training step."""

    question_id: QuestionId
    prefix_ids: TokenIds = b""
    """Cached prefix shared by every candidate (empty in full-path mode or on a cache miss)."""
    candidates: list[UpdateCandidate] = Field(min_length=1, max_length=1024)
    policy_version: Version
    """Policy version that produced the responses; stored with the chosen one."""
    min_response_len: int | None = Field(None, ge=0)
    """Shortest response length of the group in tokens (for L = "0.5l" / "l"); default: computed from the
    candidates (prefix + suffix)."""

    @model_validator(mode="after")
    def _responses_not_empty(self) -> GroupUpdate:
        if not self.prefix_ids:
            for i, c in enumerate(self.candidates):
                if not c.suffix_ids:
                    raise ValueError(f"candidates.{i}: a response needs at least one token id")
        return self

    def response_len(self, index: int) -> int:
        return token_count(self.prefix_ids) + token_count(self.candidates[index].suffix_ids)

    def group_min_len(self) -> int:
        if self.min_response_len is not None:
            return self.min_response_len
        return (len(self.prefix_ids) + min(len(c.suffix_ids) for c in self.candidates)) // TOKEN_ID_BYTES


class UpdateRequest(Wire):
    """One step's cache updates. Idempotent per (run, step, question): a retry changes nothing."""

    step: int = Field(ge=0, le=MAX_INT64)
    """Training step these groups belong to (the idempotency key, with the question id)."""
    epsilon: float = Field(ge=0.0, le=1.0, allow_inf_nan=False)
    """Probability of storing the BEST response; otherwise a uniformly chosen other one is stored."""
    only_correct: bool = False
    """Choose among correct responses only; a group with none keeps its entry (choice "none")."""
    seed: int | None = None
    """Makes the choices reproducible: a question's draw depends only on (seed, step, question id)."""
    groups: list[GroupUpdate] = Field(min_length=1)

    @field_validator("groups")
    @classmethod
    def _unique_questions(cls, value: list[GroupUpdate]) -> list[GroupUpdate]:
        _unique([g.question_id for g in value], "question ids")
        return value


class UpdateResult(Wire):
    question_id: str
    index: int | None
    """Index of the stored candidate (None when choice is "none")."""
    choice: Literal["best", "other", "none"]
    """best: highest shaped reward; other: a random other candidate; none: entry kept (no correct one)."""
    applied: bool
    """True: applied by this request. False: this (step, question) had been applied before; the outcome
    reported is the recorded one and nothing changed."""


class UpdateResponse(Wire):
    step: int
    results: list[UpdateResult]
    """results[i] answers groups[i]."""


# ---------------------------------------------------------------------------------------------------------
# Run-level operations


class RunStats(Wire):
    run_id: str
    entries: int
    """Entries (questions) the run's cache holds."""
    trained_steps: int = 0
    """Training steps whose updates the run's cache holds (recorded for the marker TTL, 7 days by default):
    non-zero means a trainer has used this run id."""


class DeleteRunResponse(Wire):
    run_id: str
    deleted_keys: int
    """Redis keys removed (entries, index, idempotency markers)."""


class ExportHeader(Wire):
    """First line of an export file (NDJSON): then one CacheEntry per line, then an ExportTrailer."""

    rpo_cache_export: Literal[1] = 1
    """Format version."""
    run_id: str
    exported_at: float
    """Unix seconds when the export started."""


class ExportTrailer(Wire):
    """Last line of an export file; its absence means the file was cut short."""

    end: Literal[True] = True
    count: int = Field(ge=0)
    """Entry lines in the file."""
