"""Our full-path and RPO steps against TRL's `GRPOTrainer`, on the same warm model, questions, batch, G and
lengths, one after the other in one run (never concurrently), on CPU.

- `full` and `rpo`: `rpo train` over fresh services (cache server, one vLLM replica, the DeepSpeed trainer),
  the `tiny-demo` preset with `algorithm.mode` full or rpo (bench/rpo_vs_grpo.py's arm);
- `trl`: TRL's `GRPOTrainer` in this process (HF `generate` on CPU), with the preset's numbers: G = 6,
  questions x G completions per step, at most `algorithm.max_response_tokens` new tokens, temperature 1,
  beta 0.04 with a reference model, `loss_type="grpo"`, lr 2e-5 constant, float32, no checkpointing,
  the same reward function (`exact` on the built-in task).
- `decode`: one step's full-path decode alone, vLLM's offline engine against HF `generate`, no service.
Step time is the mean over steps 2 onwards (step 1 holds every part's warm-up). TRL is the optional
`bench` extra (`bash scripts/bootstrap.sh cpu dev bench`), not a dependency of the project. `--preset` and
`--model` move every arm to another task: `reproduce.yaml` with `builtin:tiny-warm-long` is the long task
(answers of about 320 tokens, `rpo reproduce`'s base), where RPO decodes a tail of each.

    .venv/bin/python bench/vs_trl.py --steps 8
    .venv/bin/python bench/vs_trl.py --steps 8 --arms full,full-lag1,rpo,rpo-lag1,trl   # rollouts one step ahead
    .venv/bin/python bench/vs_trl.py --preset reproduce.yaml --model builtin:tiny-warm-long --steps 6 \
        --arms full,rpo,trl --set data.max_questions=96 --record docs/records/vs-trl-long-<date>-run1.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from rpo_vs_grpo import machine, run_arm  # noqa: E402

from services.core.config import load_config  # noqa: E402
from services.core.logs import setup_logging  # noqa: E402
from services.models.model_path import resolve_model_path  # noqa: E402
from services.supervisor.main_job import preset_path  # noqa: E402


def run_trl(args: argparse.Namespace, work: Path, model_path: Path) -> dict:
    """TRL's GRPOTrainer for `args.steps` steps on the preset's numbers; per-step wall times."""
    try:
        import datasets
        from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
        from trl import GRPOConfig, GRPOTrainer
    except ImportError as exc:
        raise SystemExit(
            f"vs_trl: TRL is missing ({exc}); install the bench extra: bash scripts/bootstrap.sh cpu dev bench"
        ) from None
    from services.core.data import build_prompt_text, load_questions
    from services.core.rewards import resolve_reward

    cfg = load_config(preset_path(args.preset), args.set)
    a = cfg.algorithm
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    questions = load_questions(
        cfg.data.dataset,
        cfg.data,
        limit=min(args.steps * args.questions_per_step, cfg.data.max_questions or 10**9),
    )
    rows = [{"prompt": build_prompt_text(tokenizer, q, cfg.data), "answer": q.answer} for q in questions]
    reward = resolve_reward(cfg.reward.function, cfg.data.dataset)

    def reward_func(prompts, completions, answer, **_):
        return [reward(c, ref) for c, ref in zip(completions, answer, strict=True)]

    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_args, **_kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, *_args, **_kwargs):
            times.append(time.perf_counter() - self.started)
            print(f"[trl] step {len(times)}: {times[-1]:.2f} s", flush=True)

    config = GRPOConfig(
        output_dir=str(work / "trl"),
        per_device_train_batch_size=args.questions_per_step * a.group_size,
        num_generations=a.group_size,
        max_completion_length=a.max_response_tokens,
        temperature=cfg.sampling.temperature,
        beta=a.beta,
        loss_type="grpo",
        epsilon=a.clip_eps,
        learning_rate=cfg.train.lr,
        lr_scheduler_type="constant",
        max_steps=args.steps,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        seed=cfg.train.seed,
        disable_tqdm=True,
    )
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype="float32")
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward_func,
        args=config,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[StepTimer()],
    )
    trainer.train()
    later = times[1:] or times
    return {"steps": len(times), "first_step_seconds": times[0], "step_seconds": statistics.fmean(later)}


def run_decode(args: argparse.Namespace, model_path: Path, rounds: int = 4) -> dict:
    """One step's full-path decode alone, no service around it: vLLM's offline `LLM.generate` (the engine
    settings and environment of a replica) against HF `generate` (what TRL decodes with), same prompts, n,
    max tokens and temperature; median seconds over `rounds` after a warm-up round."""
    import os

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import tokens_input

    from services.core.data import encode_prompt, load_questions
    from services.rollout.engine import engine_environment, engine_kwargs

    cfg = load_config(preset_path(args.preset), args.set)
    a = cfg.algorithm
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    questions = load_questions(cfg.data.dataset, cfg.data, limit=args.questions_per_step)
    prompts = [encode_prompt(tokenizer, q, cfg.data) for q in questions]
    os.environ.update(engine_environment(cfg, on_cpu=True))
    llm = LLM(**engine_kwargs(cfg, model_path, on_cpu=True))
    params = SamplingParams(
        n=a.group_size, max_tokens=a.max_response_tokens, temperature=1.0, logprobs=0, detokenize=False
    )
    vllm_times = []
    for _round in range(rounds + 1):
        started = time.perf_counter()
        llm.generate([tokens_input(p) for p in prompts], params, use_tqdm=False)
        vllm_times.append(time.perf_counter() - started)
    del llm
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])  # left-padded, as TRL does
    mask = (torch.arange(width)[None, :] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
    hf_times = []
    for _round in range(rounds + 1):
        started = time.perf_counter()
        with torch.no_grad():
            model.generate(
                input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                max_new_tokens=a.max_response_tokens, num_return_sequences=a.group_size, pad_token_id=pad,
            )  # fmt: skip
        hf_times.append(time.perf_counter() - started)
    return {
        "vllm_offline_seconds": statistics.median(vllm_times[1:]),
        "hf_generate_seconds": statistics.median(hf_times[1:]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--questions-per-step", type=int, default=16)
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="config override, all arms"
    )
    parser.add_argument(
        "--preset", default="tiny-demo.yaml", help="the built-in preset every arm starts from"
    )
    parser.add_argument("--model", default="builtin:tiny-warm", help="model path or built-in name, every arm")
    parser.add_argument("--record", type=Path, help="also write the figures and the command as JSON here")
    parser.add_argument(
        "--arms",
        default="full,rpo,trl,decode",
        help="comma-separated: full, rpo, trl, decode; full-lag1 and rpo-lag1 run with train.max_lag 1",
    )
    args = parser.parse_args()
    setup_logging("INFO")
    started = time.monotonic()
    model_path = resolve_model_path(args.model)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="rpo-vs-trl-") as tmp:
        for arm in args.arms.split(","):
            if arm == "trl":
                results[arm] = run_trl(args, Path(tmp), model_path)
            elif arm == "decode":
                results[arm] = run_decode(args, model_path)
            else:  # full, rpo; with -lag1, the rollouts one step ahead (train.max_lag 1)
                mode, _, lag = arm.partition("-lag")
                arm_args = argparse.Namespace(
                    **{**vars(args), "set": [f"train.max_lag={lag or 0}", *args.set]}
                )
                work = Path(tmp) / arm
                work.mkdir()
                results[arm] = run_arm(mode, arm_args, work, model_path)
    command = f".venv/bin/python bench/vs_trl.py --steps {args.steps} --questions-per-step {args.questions_per_step}"
    command += f" --preset {args.preset} --model {args.model} --arms {args.arms}"
    command += "".join(f" --set {o}" for o in args.set)
    print(f"\nCommand: `{command}` ({(time.monotonic() - started) / 60:.1f} min in all), on {machine()}.\n")
    print(
        "| arm | step time, s (steps 2..) | first step, s | train phase, s | rollout phase, s | step / TRL's |"
    )
    print("|---|---|---|---|---|---|")
    trl = results.get("trl", {}).get("step_seconds")
    for arm, r in results.items():
        if arm == "decode":
            continue
        phases = r.get("phases", {})
        ratio = f"{r['step_seconds'] / trl:.2f}" if trl else "-"
        train = f"{phases['train']:.2f}" if "train" in phases else "(inside)"
        rollout = f"{phases['rollout']:.2f}" if "rollout" in phases else "(inside)"
        print(
            f"| {arm} | {r['step_seconds']:.2f} | {r['first_step_seconds']:.2f} | {train} | {rollout} | {ratio} |"
        )
    if "decode" in results:
        d = results["decode"]
        print(
            f"\nOne step's full-path decode alone: vLLM offline {d['vllm_offline_seconds']:.2f} s, "
            f"HF generate {d['hf_generate_seconds']:.2f} s"
        )
    print(json.dumps(results, indent=1))
    if args.record:
        record = {
            "command": command,
            "date": date.today().isoformat(),
            "machine": machine(),
            "minutes": round((time.monotonic() - started) / 60, 1),
            "arms": results,
            "step_vs_trl": {
                arm: r["step_seconds"] / trl for arm, r in results.items() if trl and arm != "decode"
            },
        }
        args.record.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
