"""The tiny Qwen2 factory: HF loading, head_dim 64, tie settings, the character tokenizer, the cache, warm start."""

import logging
import re
import threading

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from services.core.synthetic import PROMPT_TEMPLATE, SyntheticTaskConfig, make_split
from services.models.tiny_model import (
    BOS_ID,
    BYTE_OFFSET,
    EOS_ID,
    PAD_ID,
    VOCAB_SIZE,
    build_tiny_model,
    greedy_accuracy,
    warm_start,
)
from services.models.tiny_model_cache import cached_tiny_model, tiny_model_path


@pytest.mark.parametrize("fixture,tied", [("tiny_model_dir", True), ("tiny_model_untied_dir", False)])
def test_loads_in_transformers_with_head_dim_64(request, fixture, tied):
    path = request.getfixturevalue(fixture)
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    cfg = model.config
    assert cfg.model_type == "qwen2" and model.dtype == torch.float32
    assert cfg.hidden_size // cfg.num_attention_heads == 64 and cfg.head_dim == 64
    assert cfg.tie_word_embeddings is tied
    same = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert same is tied
    assert cfg.vocab_size == len(tok)
    assert (cfg.eos_token_id, cfg.pad_token_id, cfg.bos_token_id) == (EOS_ID, PAD_ID, BOS_ID)
    ids = tok(PROMPT_TEMPLATE.format(question="1+2=?"), return_tensors="pt")["input_ids"]
    out = model.generate(ids, do_sample=False, max_new_tokens=5, pad_token_id=PAD_ID)
    assert out.shape[1] <= ids.shape[1] + 5


def test_random_kinds_give_varied_greedy_output(tiny_model_dir, tiny_model_untied_dir):
    """A parity test against another engine needs more than one repeated token to mean anything."""
    for path in (tiny_model_dir, tiny_model_untied_dir):
        model = AutoModelForCausalLM.from_pretrained(path)
        tok = AutoTokenizer.from_pretrained(path)
        ids = tok(PROMPT_TEMPLATE.format(question="12+34=?"), return_tensors="pt")["input_ids"]
        out = model.generate(ids, do_sample=False, max_new_tokens=20, pad_token_id=PAD_ID)
        assert len(set(out[0, ids.shape[1] :].tolist())) >= 5


def test_tokenizer_round_trips_task_text_one_token_per_character(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert (tok.eos_token_id, tok.pad_token_id, tok.bos_token_id) == (EOS_ID, PAD_ID, BOS_ID)
    assert len(tok) == VOCAB_SIZE
    raw = PreTrainedTokenizerFast(
        tokenizer_file=str(tiny_model_dir / "tokenizer.json")
    )  # what tokenizer.json says
    cfg = SyntheticTaskConfig(num_terms=6, max_digits=3, train_size=50, eval_size=5)
    for row in make_split(cfg, "train"):
        text = PROMPT_TEMPLATE.format(question=row["question"]) + row["solution"]
        ids = tok(text)["input_ids"]
        assert ids == [BYTE_OFFSET + ord(c) for c in text]  # no bos added, one token per character
        assert raw(text)["input_ids"] == ids
        assert tok.decode(ids) == text
        assert tok.decode(ids + [EOS_ID, PAD_ID], skip_special_tokens=True) == text
    every_ascii = "".join(chr(b) for b in range(128))
    assert tok.decode(tok(every_ascii)["input_ids"]) == every_ascii
    assert all(
        len(tok.decode([i])) == 1 for i in range(BYTE_OFFSET, VOCAB_SIZE)
    )  # each id alone: streaming-safe
    assert tok.decode(tok("1é2")["input_ids"]) == "12"  # non-ASCII is dropped (documented)


def test_same_seed_same_weights(tmp_path):
    a = load_file(build_tiny_model(tmp_path / "a", seed=3) / "model.safetensors")
    b = load_file(build_tiny_model(tmp_path / "b", seed=3) / "model.safetensors")
    c = load_file(build_tiny_model(tmp_path / "c", seed=4) / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_head_dim_other_than_64_is_refused(tmp_path):
    with pytest.raises(ValueError, match="head_dim"):
        build_tiny_model(tmp_path / "m", hidden_size=96)


def test_cache_builds_once_under_concurrency(tmp_path):
    results: list = []
    threads = [
        threading.Thread(target=lambda: results.append(cached_tiny_model("random-tied", tmp_path)))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and results[0] == tiny_model_path("random-tied", tmp_path)
    built = results[0]
    mtime = (built / "model.safetensors").stat().st_mtime_ns
    assert cached_tiny_model("random-tied", tmp_path) == built
    assert (built / "model.safetensors").stat().st_mtime_ns == mtime
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [built.name]  # no temp dir left
    assert tiny_model_path("random-untied", tmp_path) != built
    with pytest.raises(ValueError, match="random-tied"):
        cached_tiny_model("huge", tmp_path)


def test_a_short_warm_start_lowers_the_loss_and_saves_a_loadable_model(
    tmp_path, tiny_model_dir, caplog, capfd
):
    task = SyntheticTaskConfig(num_terms=2, max_digits=2, train_size=256, eval_size=8)
    start = build_tiny_model(tmp_path / "start", num_layers=2)
    capfd.readouterr()
    with caplog.at_level(logging.INFO, logger="services.models.tiny_model"):
        metrics = warm_start(
            start, tmp_path / "warm", task_cfg=task, steps=40, batch_size=32, eval_questions=8
        )
    assert metrics["steps"] == 40 and metrics["eval_questions"] == 8
    # stderr is not a terminal under pytest: progress comes as log lines, not a redrawn bar.
    assert any("warm start step 40/40 loss" in r.getMessage() for r in caplog.records)
    assert not re.search(r"warm start:\s+\d+%", capfd.readouterr().err)  # the bar's own text
    assert metrics["final_loss"] < 0.5 * metrics["first_loss"]
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "warm")
    tok = AutoTokenizer.from_pretrained(tmp_path / "warm")
    assert tok.get_vocab() == AutoTokenizer.from_pretrained(tiny_model_dir).get_vocab()
    assert greedy_accuracy(model, tok, make_split(task, "eval")) == metrics["eval_accuracy"]
    # served by containers under another uid: every file readable by all (safetensors writes 0600)
    for directory in (start, tmp_path / "warm"):
        assert all(f.stat().st_mode & 0o444 == 0o444 for f in directory.iterdir()), directory


def test_warm_model_is_partly_right_on_held_out_questions(warm_model_dir):
    model = AutoModelForCausalLM.from_pretrained(warm_model_dir)
    tok = AutoTokenizer.from_pretrained(warm_model_dir)
    rows = make_split(SyntheticTaskConfig(), "eval")[:64]
    accuracy = greedy_accuracy(model, tok, rows)
    assert 0.2 <= accuracy <= 0.95  # clearly non-zero, with room left for RL


def test_a_constant_rate_build_is_exactly_the_first_steps_of_a_longer_one(tmp_path):
    """What lets one probe run choose the long warm start's length: its checkpoint at N steps is the N-step build."""
    random_dir = build_tiny_model(tmp_path / "random", num_layers=2, seed=0)
    task = SyntheticTaskConfig(train_size=200, eval_size=10)
    snapshot = {}

    def keep(step, model):
        if step == 6:
            snapshot.update({k: v.detach().clone() for k, v in model.state_dict().items()})

    common = {
        "task_cfg": task,
        "schedule": "constant",
        "eval_questions": 0,
        "progress": False,
        "batch_size": 4,
    }
    warm_start(random_dir, tmp_path / "long", steps=9, on_step=keep, **common)
    warm_start(random_dir, tmp_path / "short", steps=6, **common)
    short = load_file(tmp_path / "short" / "model.safetensors")
    assert set(short) <= set(snapshot)
    assert all(torch.equal(short[name], snapshot[name]) for name in short)
    with pytest.raises(ValueError, match="schedule"):
        warm_start(random_dir, tmp_path / "bad", steps=1, **{**common, "schedule": "linear"})


def test_the_varied_long_model_is_the_long_recipe_with_the_varied_wording(tmp_path):
    """`builtin:tiny-warm-long-var` is built like `builtin:tiny-warm-long` in every respect but the task's
    wording, and is kept apart from it."""
    from services.models.model_path import BUILTIN_MODELS
    from services.models.tiny_model_cache import _recipe, tiny_model_path

    full, varied = _recipe("warm-long"), _recipe("warm-long-var")
    assert varied["warm"]["task"] == {**full["warm"]["task"], "wording": "varied"}
    assert full["warm"]["task"]["wording"] == "full"
    assert {**varied["warm"], "task": None} == {**full["warm"], "task": None}
    assert varied["build"] == full["build"]
    assert tiny_model_path("warm-long-var", tmp_path) != tiny_model_path("warm-long", tmp_path)
    assert BUILTIN_MODELS["builtin:tiny-warm-long-var"] == "warm-long-var"
