"""`rpo cache init`: the stored answer, and seeding through the real services (resumable)."""

from __future__ import annotations

from trainer.cache_init import answer_tokens


def test_the_stored_answer_drops_the_stop_token_only():
    assert answer_tokens([7, 8, 2], "stop") == [7, 8]  # EOS (or a stop token) ends a `stop` finish
    assert answer_tokens([7, 8, 9], "length") == [7, 8, 9]  # cut by the length cap: nothing to drop
    assert answer_tokens([2], "stop") == []  # nothing left to store: the question stays a miss
