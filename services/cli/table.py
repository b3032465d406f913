"""The table of `rpo` commands. Each handler lives in the package that owns the feature ("module:function")
and is imported only when its command runs; handlers read their config through `services.core.cli_args`, never
through this table.

Shortcut flags (`--model`, `--port`, ...) are sugar for `--set section.field=VALUE`, so a flag, a YAML key
and an environment variable always name the same setting.
"""

from __future__ import annotations

import argparse
import importlib

from services.core.cli_args import Command, Flag, UsageError, add_config_args, add_logging_args

MODEL_HELP = "a Hugging Face Hub id (Qwen/Qwen2.5-0.5B-Instruct) or an HF model directory"
DATASET_HELP = "a Hugging Face Hub id (openai/gsm8k), a .jsonl/.json/.csv/.parquet file or a folder"

COMMANDS: tuple[Command, ...] = (
    Command(
        ("run",),
        "the main job: start Redis, the cache server, a rollout replica and the trainer on localhost, "
        "train, evaluate and print a summary",
        "services.supervisor.main_job:run_main",
        (
            Flag(
                "--model", "the policy: " + MODEL_HELP + " (no --config: the library defaults)", "model.path"
            ),
            Flag("--dataset", "training questions: " + DATASET_HELP, "data.dataset"),
            Flag(
                "--eval-dataset",
                "evaluation questions (default auto: see data.eval_dataset)",
                "data.eval_dataset",
            ),
            Flag("--run-dir", "where the run's logs, checkpoints and final model go", "train.run_dir"),
            Flag(
                "--resume",
                "continue the interrupted run in --run-dir (train.run_dir) from its last checkpoint",
                None,
                {"action": "store_true"},
            ),
        ),
    ),
    Command(
        ("reproduce",),
        "the paper's comparison in miniature: GRPO and RPO+GRPO (with and without the length reward), RPO+GRPO "
        "at L=0.1l and epsilon 0 and 1, DAPO and RPO+DAPO, from one warm model, over training seeds; writes "
        "results.json, results.md and plots",
        "services.reproduction.reproduce:reproduce_main",
        (
            Flag("--run-dir", "where the arms, results and plots go", "train.run_dir"),
            Flag("--steps", "training steps per arm (default: the config's)", None, {"type": int}),
            Flag(
                "--smoke",
                "two steps per arm on the short task's warm model (what the tests run)",
                None,
                {"action": "store_true"},
            ),
            Flag(
                "--seeds",
                "training seeds per arm (DAPO arms run at the first only)",
                None,
                {"type": int, "default": 1},
            ),
            Flag("--arms", "run only these arms (comma-separated), e.g. to run the protocol in parts", None),
            Flag(
                "--task",
                "the protocol: arith-long (default); arith-long-var, the task whose correct answers vary "
                "in length (its own preset and arms); arith-long-var-budget, its headline pairs with RPO's "
                "suffix budget fixed at 160 tokens",
                None,
            ),
        ),
    ),
    Command(
        ("train",),
        "run the DeepSpeed trainer against running cache and rollout services",
        "trainer.train:train_main",
        (
            Flag(
                "--resume",
                "continue from the last checkpoint in the run directory",
                None,
                {"action": "store_true"},
            ),
            # DeepSpeed's launcher appends --local_rank=N unless given --no_local_rank; the rank is read
            # from the environment (LOCAL_RANK) either way.
            Flag("--local_rank", argparse.SUPPRESS, None, {"type": int, "dest": "local_rank"}),
        ),
    ),
    Command(
        ("eval",),
        "pass@1 / pass@k of a model on a dataset through the rollout service",
        "services.supervisor.eval_job:eval_main",
        (
            Flag("--model", MODEL_HELP, "model.path"),
            Flag(
                "--dataset",
                "questions to evaluate on: " + DATASET_HELP + " (split: data.eval_split)",
                "data.eval_dataset",
            ),
        ),
    ),
    Command(
        ("serve", "cache"),
        "the experience cache service (FastAPI over Redis)",
        "cache_server.server:serve_main",
        (
            Flag("--host", "bind address", "cache_server.host"),
            Flag("--port", "port", "cache_server.port"),
            Flag("--redis-url", "Redis to use; omit to start the embedded server", "services.redis_url"),
        ),
    ),
    Command(
        ("serve", "rollout"),
        "a rollout replica (vLLM behind FastAPI)",
        "services.rollout.server:serve_main",
        (
            Flag("--model", MODEL_HELP, "model.path"),
            Flag("--host", "bind address", "rollout.host"),
            Flag("--port", "port", "rollout.port"),
            Flag("--cache-url", "cache server base URL", "services.cache_url"),
        ),
    ),
    Command(
        ("cache", "init"),
        "seed the cache with one sampled answer per training question (resumable)",
        "trainer.rollouts.cache_init:cache_init_main",
    ),
    Command(
        ("cache", "export"),
        "stream a run's cache entries to a file",
        "cache_server.admin:export_main",
        (Flag("--out", "file to write", None, {"required": True}),),
    ),
    Command(
        ("cache", "import"),
        "load cache entries from an export file",
        "cache_server.admin:import_main",
        (
            Flag(
                "--in",
                "export file to read",
                None,
                {"required": True, "dest": "in_file"},
                aliases=("--file",),
            ),
        ),
    ),
    Command(("cache", "stats"), "count a run's entries", "cache_server.admin:stats_main"),
    Command(
        ("model", "tiny"),
        "build the embedded tiny model (optionally warm-started on the synthetic task)",
        "services.models.make:tiny_model_main",
        (
            Flag("--out", "directory to write the HF model to", None, {"required": True}),
            Flag("--warm-start", "teach it the synthetic task first", None, {"action": "store_true"}),
        ),
    ),
    Command(
        ("data", "inspect"),
        "load a dataset exactly as training would: rows, repeats dropped, a prompt as the model sees it, "
        "how the reward scores the reference answers",
        "services.cli.data_inspect:inspect_main",
        (Flag("path", "the dataset: " + DATASET_HELP + " (data.subset, data.split apply)"),),
    ),
    Command(
        ("data", "synth"),
        "write the synthetic arithmetic task as train.jsonl / eval.jsonl",
        "services.models.make:synth_data_main",
        (Flag("--out", "directory to write to", None, {"required": True}),),
    ),
    Command(
        ("compose", "init"),
        "put what `docker compose up` reads in place: .env, ./models/policy, ./data, ./runs (the tiny model "
        "and the synthetic task unless --model/--dataset name yours)",
        "services.compose.init:compose_init_main",
        (
            Flag("--cpu", "use the CPU profile (deploy/compose.cpu.yml)", None, {"action": "store_true"}),
            Flag("--model", "your model: " + MODEL_HELP + " (default: the tiny warm model)", None),
            Flag("--dataset", "your training questions: " + DATASET_HELP, None),
            Flag("--eval-dataset", "your evaluation questions (default: the dataset's test split)", None),
            Flag("--subset", "the dataset's subset (data.subset), e.g. main for openai/gsm8k", None),
            Flag("--force", "replace a model or data already in place", None, {"action": "store_true"}),
            Flag("--dir", "the directory holding docker-compose.yml", None, {"default": "."}),
        ),
    ),
    Command(
        ("plan",),
        "the memory plan of a run: weights, gradients, optimizer state, activations, KV cache and headroom per "
        "process and per GPU; exit 2, naming the settings that would fit, when it does not fit",
        "services.cli.plan:plan_main",
        (
            Flag("--model", "the model (directory, config.json, Hub id)", "model.path"),
            Flag("--gpus", "plan for a box of N GPUs (default: this machine's)", None, {"type": int}),
            Flag("--gpu-memory", "each GPU's memory, e.g. 80GiB or 24GB (with --gpus)", None),
            Flag("--replicas", "rollout replicas (rpo run starts 1)", None, {"type": int, "default": 1}),
            Flag(
                "--prompt-tokens",
                "prompt tokens of a training row (default: what the context leaves the response)",
                None,
                {"type": int},
            ),
        ),
    ),
    Command(
        ("slurm", "script"),
        "write the sbatch script that runs the whole stack in one Slurm allocation for a layout (nodes, GPUs "
        "per node, trainer ranks, replicas): docs/deploy.md, Past one machine",
        "services.cluster.slurm:script_main",
        (
            Flag("--nodes", "nodes of the allocation", None, {"type": int, "default": 1}),
            Flag(
                "--gpus-per-node", "GPUs of each node (0: the CPU profile)", None, {"type": int, "default": 0}
            ),
            Flag(
                "--trainer-ranks",
                "trainer processes (one GPU each on GPUs)",
                None,
                {"type": int, "default": 1},
            ),
            Flag("--replicas", "rollout replicas (default: every GPU left; 2 on CPU)", None, {"type": int}),
            Flag("--gpus-per-replica", "GPUs of each replica", None, {"type": int, "default": 1}),
            Flag("--run-dir", "the run directory on shared storage (default train.run_dir)", None),
            Flag("--out", "file to write (default: stdout)", None),
            Flag("--job-name", "Slurm job name", None, {"default": "rpo"}),
            Flag("--time", "Slurm time limit, e.g. 2-00:00:00", None),
            Flag("--partition", "Slurm partition", None),
            Flag("--account", "Slurm account", None),
            Flag("--env-file", "secrets file the job reads (default ~/.config/rpo/slurm.env)", None),
            Flag("--python", "the interpreter on the nodes (default: this one)", None),
            Flag("--cache-port", "cache server port on the first node", None, {"type": int, "default": 8100}),
            Flag(
                "--rollout-port",
                "first replica port of a node (+2 per replica)",
                None,
                {"type": int, "default": 8200},
            ),
            Flag("--metrics-port", "trainer metrics port", None, {"type": int, "default": 9100}),
            Flag("--master-port", "trainer ranks' rendezvous port", None, {"type": int, "default": 29500}),
        ),
    ),
    Command(
        ("config", "show"),
        "print the resolved configuration as YAML",
        "services.cli.config_docs:config_show_main",
        (
            Flag(
                "--run",
                "show what `rpo run` uses (its built-in preset unless --config) instead of the library defaults",
                None,
                {"action": "store_true"},
            ),
        ),
    ),
)


def _run_handler(args: argparse.Namespace) -> int | None:
    module_name, func_name = args.command_spec.handler.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise UsageError(f"this install has no {module_name} (the command is not available)") from None
        raise
    return getattr(module, func_name)(args)


def register(subparsers: argparse._SubParsersAction) -> None:
    groups: dict[str, argparse._SubParsersAction] = {}
    for command in COMMANDS:
        if len(command.path) == 1:
            parser = subparsers.add_parser(command.path[0], help=command.help, description=command.help)
        else:
            group, name = command.path
            if group not in groups:
                group_parser = subparsers.add_parser(group, help=f"{group} commands")
                groups[group] = group_parser.add_subparsers(
                    dest="subcommand", metavar="SUBCOMMAND", required=True
                )
            parser = groups[group].add_parser(name, help=command.help, description=command.help)
        add_config_args(parser)
        add_logging_args(parser, with_defaults=False)
        for flag in command.flags:
            parser.add_argument(flag.name, *flag.aliases, help=flag.help, **flag.kwargs)
        # command_parser: main() reports a stray argument with this command's usage, not the top level's
        parser.set_defaults(handler=_run_handler, command_spec=command, command_parser=parser)
