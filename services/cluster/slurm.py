"""`rpo slurm script`: the sbatch script that runs the whole stack in one Slurm allocation, written for a
layout (nodes, GPUs per node, trainer ranks, replicas) so that nobody hand-edits one.

What the script does, in order: reads the secrets file (`--env-file`, default `~/.config/rpo/slurm.env`) and
makes a token for the job when it names none; maps the layout onto the allocation's hosts
(`scontrol show hostnames`); starts the cache server (with its embedded Redis, append-only file under
`<run_dir>/redis`) on the first node and each rollout replica on its node and GPUs, every one its own job
step (`srun --overlap`); waits for each `/readyz`; then starts the trainer as one step of DeepSpeed ranks
(`RANK`, `LOCAL_RANK`, `WORLD_SIZE` from Slurm's task ids, `--kill-on-bad-exit`) running `rpo train
--resume`, so a requeued job continues from its last checkpoint with the cache restored from it (cache
updates are idempotent per step and question: none is applied twice). Replicas are passed to the trainer
as `services.rollout_urls` built from the allocation's node list.

Guarantees of the script: the environment reaches every step (srun exports it; secrets never appear on a
command line); `scancel`, `scontrol requeue`, the time limit (SIGUSR1 five minutes before it: the job
checkpoints and requeues itself) or any part failing all end in the same clean-up: the trainer gets
SIGTERM first and finishes its step and checkpoint, then every step is signalled, waited for and, past a
timeout, killed, so no process of the job is left behind. A replica that dies is named and restarted
(three times at most); a cache server that dies ends the job with its name and log.

`RPO_SLURM_DRY_RUN=1 RPO_SLURM_NODES="a b" bash SCRIPT` prints the steps it would start on those hosts
and the environment they get, and starts nothing (what the test suite runs). deploy/slurm/example-2x4.sbatch
is the script for two 4-GPU nodes (`python -m services.cluster.slurm example` rewrites it; the suite
checks it is current).
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.cluster.slurm_template import TEMPLATE
from services.core.cli_args import UsageError, config_from_args

DEFAULT_ENV_FILE = "$HOME/.config/rpo/slurm.env"
EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "slurm" / "example-2x4.sbatch"
REPLICA_RESTARTS = 3
TRAINER_STOP_SECONDS = 240
"""After SIGTERM, how long the trainer may take to finish its step and checkpoint before it is killed."""


@dataclass(frozen=True)
class Replica:
    index: int
    node: int
    gpus: tuple[int, ...]
    port: int

    @property
    def name(self) -> str:
        return f"rollout-{self.index}"


@dataclass(frozen=True)
class Layout:
    """Where each process of the job runs: node indices into the allocation's host list."""

    nodes: int
    gpus_per_node: int
    trainer_ranks: int
    trainer_nodes: int
    replicas: tuple[Replica, ...]

    @property
    def cpu(self) -> bool:
        return self.gpus_per_node == 0

    def describe(self) -> str:
        where = "CPU" if self.cpu else f"{self.gpus_per_node} GPU(s) per node"
        lines = [
            f"{self.nodes} node(s), {where}",
            f"node 0: Redis and the cache server; trainer: {self.trainer_ranks} rank(s) on node(s) "
            f"0-{self.trainer_nodes - 1}",
        ]
        for r in self.replicas:
            gpus = f" GPU(s) {','.join(map(str, r.gpus))}" if r.gpus else ""
            lines.append(f"{r.name}: node {r.node}{gpus}, port {r.port} (weights {r.port + 1})")
        return "\n".join(lines)


def plan_layout(
    nodes: int,
    gpus_per_node: int,
    trainer_ranks: int = 1,
    replicas: int | None = None,
    gpus_per_replica: int = 1,
    rollout_port: int = 8200,
) -> Layout:
    """Place the trainer and the replicas; a UsageError names what does not fit.

    GPUs: the trainer's ranks take the first GPUs (of node 0, or whole nodes when there are more ranks
    than a node has GPUs); each replica takes `gpus_per_replica` of the GPUs left on one node; by default
    every GPU left serves a replica. CPU (`gpus_per_node` 0): the trainer's ranks on node 0, replicas
    spread over the other nodes (over node 0 when it is the only one). Replicas on one node listen on
    `rollout_port`, `rollout_port + 2`, ... (each with its weight port one above)."""
    if nodes < 1 or gpus_per_node < 0 or trainer_ranks < 1 or gpus_per_replica < 1:
        raise UsageError(
            "--nodes, --trainer-ranks and --gpus-per-replica must be at least 1, --gpus-per-node 0 or more"
        )
    slots: list[tuple[int, tuple[int, ...]]] = []  # (node, GPUs) a replica may take
    if gpus_per_node == 0:
        trainer_nodes = 1
        hosts = list(range(1, nodes)) or [0]
        count = 2 if replicas is None else replicas
        slots = [(hosts[i % len(hosts)], ()) for i in range(count)]
    else:
        if trainer_ranks <= gpus_per_node:
            trainer_nodes = 1
        elif trainer_ranks % gpus_per_node == 0:
            trainer_nodes = trainer_ranks // gpus_per_node
        else:
            raise UsageError(
                f"--trainer-ranks {trainer_ranks}: more ranks than a node's {gpus_per_node} GPUs must fill whole "
                f"nodes (a multiple of {gpus_per_node})"
            )
        if trainer_nodes > nodes:
            raise UsageError(
                f"--trainer-ranks {trainer_ranks} needs {trainer_nodes} nodes; the layout has {nodes}"
            )
        for node in range(nodes):
            first = trainer_ranks if node == 0 and trainer_nodes == 1 else 0
            if node < trainer_nodes and trainer_nodes > 1:
                continue
            free = list(range(first, gpus_per_node))
            for k in range(len(free) // gpus_per_replica):
                slots.append((node, tuple(free[k * gpus_per_replica : (k + 1) * gpus_per_replica])))
        count = len(slots) if replicas is None else replicas
        if count > len(slots):
            raise UsageError(
                f"--replicas {count} x {gpus_per_replica} GPU(s) do not fit: {nodes} node(s) x {gpus_per_node} GPUs "
                f"less the trainer's {trainer_ranks} leave room for {len(slots)} replica(s)"
            )
    if count < 1:
        raise UsageError("--replicas: the job needs at least one rollout replica")
    placed: list[Replica] = []
    per_node: dict[int, int] = {}
    for i, (node, gpus) in enumerate(slots[:count]):
        k = per_node.get(node, 0)
        per_node[node] = k + 1
        placed.append(Replica(i, node, gpus, rollout_port + 2 * k))
    return Layout(nodes, gpus_per_node, trainer_ranks, trainer_nodes, tuple(placed))


def render_script(
    layout: Layout,
    *,
    config_file: Path,
    run_dir: Path,
    python: str,
    job_name: str = "rpo",
    time_limit: str | None = None,
    partition: str | None = None,
    account: str | None = None,
    env_file: str = DEFAULT_ENV_FILE,
    cache_port: int = 8100,
    metrics_port: int = 9100,
    master_port: int = 29500,
    command_line: str = "",
) -> str:
    """The sbatch script for `layout` (bash; see the module docstring for what it does)."""
    q = shlex.quote
    sbatch = [f"--job-name={job_name}", f"--nodes={layout.nodes}", "--exclusive", "--requeue"]
    sbatch += ["--open-mode=append", f"--output={run_dir}/slurm-%j.out", "--signal=B:USR1@300"]
    if layout.gpus_per_node:
        sbatch.append(f"--gres=gpu:{layout.gpus_per_node}")
    if time_limit:
        sbatch.append(f"--time={time_limit}")
    if partition:
        sbatch.append(f"--partition={partition}")
    if account:
        sbatch.append(f"--account={account}")
    gres = f" --gres=gpu:{layout.gpus_per_node}" if layout.gpus_per_node else ""
    replicas = []
    for r in layout.replicas:
        gpus = ",".join(map(str, r.gpus))
        replicas.append(f"{r.name}:{r.node}:{r.port}:{gpus}")
    trainer_gpus = (
        ",".join(map(str, range(layout.trainer_ranks)))
        if layout.gpus_per_node and layout.trainer_nodes == 1
        else ""
    )
    per_node = (
        min(layout.trainer_ranks, layout.gpus_per_node) if layout.gpus_per_node else layout.trainer_ranks
    )
    values = {
        "SBATCH": "\n".join(f"#SBATCH {line}" for line in sbatch),
        "DESCRIBE": "\n".join(f"#   {line}" for line in layout.describe().splitlines()),
        "COMMAND_LINE": command_line,
        "PYTHON": q(python),
        "CONFIG": q(str(config_file)),
        "RUN_DIR": q(str(run_dir)),
        "ENV_FILE": env_file if env_file == DEFAULT_ENV_FILE else q(env_file),
        "NODES": str(layout.nodes),
        "CACHE_PORT": str(cache_port),
        "METRICS_PORT": str(metrics_port),
        "MASTER_PORT": str(master_port),
        "REPLICAS": " ".join(replicas),
        "GRES": gres,
        "CPU": "1" if layout.cpu else "0",
        "TRAINER_RANKS": str(layout.trainer_ranks),
        "TRAINER_NODES": str(layout.trainer_nodes),
        "TRAINER_PER_NODE": str(per_node),
        "TRAINER_GPUS": trainer_gpus,
        "GPUS_PER_REPLICA": str(max(len(layout.replicas[0].gpus), 1)),
        "RESTARTS": str(REPLICA_RESTARTS),
        "STOP_SECONDS": str(TRAINER_STOP_SECONDS),
    }
    text = TEMPLATE
    for key, value in values.items():
        text = text.replace("@" + key + "@", value)
    return text


def script_main(args: Any) -> int:
    """`rpo slurm script`: write the script (stdout or --out) and say where each process runs."""
    if not getattr(args, "config", None):
        raise UsageError("--config: name the run configuration the job trains with (a YAML file)")
    config_file = Path(args.config).resolve()
    cfg = config_from_args(args)  # a bad file or setting stops here, not on the cluster
    run_dir = Path(args.run_dir or cfg.train.run_dir).resolve()
    layout = plan_layout(
        args.nodes,
        args.gpus_per_node,
        args.trainer_ranks,
        args.replicas,
        args.gpus_per_replica,
        args.rollout_port,
    )
    ports = [args.cache_port, args.metrics_port, args.master_port, args.rollout_port]
    if any(not 1024 <= p <= 65000 for p in ports):
        raise UsageError(f"ports must be within 1024-65000 (got {ports})")
    if cfg.services.redis_url is not None:
        raise UsageError(
            "services.redis_url: the Slurm job runs its own Redis beside the cache server; leave it unset"
        )
    text = render_script(
        layout,
        config_file=config_file,
        run_dir=run_dir,
        python=args.python or sys.executable,
        job_name=args.job_name,
        time_limit=args.time,
        partition=args.partition,
        account=args.account,
        env_file=args.env_file or DEFAULT_ENV_FILE,
        cache_port=args.cache_port,
        metrics_port=args.metrics_port,
        master_port=args.master_port,
        command_line=_command_line(args, config_file),
    )
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)  # Slurm opens the job's output there at start
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        out.chmod(0o755)
        print(f"wrote {out}: sbatch {out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    print(layout.describe(), file=sys.stderr)
    return 0


def _command_line(args: Any, config_file: Path) -> str:
    """The command that wrote the script, from the parsed options (for its header)."""
    parts = ["rpo", "slurm", "script", "--config", str(config_file)]
    for flag in args.command_spec.flags:
        value = getattr(args, flag.kwargs.get("dest", flag.name.lstrip("-").replace("-", "_")), None)
        if value is not None and value != flag.kwargs.get("default"):
            parts += [flag.name, str(value)]
    return shlex.join(parts)


def example_script() -> str:
    """deploy/slurm/example-2x4.sbatch: two nodes of 4 GPUs, one trainer GPU, 7 replicas."""
    return render_script(
        plan_layout(2, 4),
        config_file=Path("/shared/rpo/run.yaml"),
        run_dir=Path("/shared/rpo/runs/first"),
        python="/shared/rpo/.venv/bin/python",
        time_limit="2-00:00:00",
        command_line="rpo slurm script --config /shared/rpo/run.yaml --nodes 2 --gpus-per-node 4 "
        "--run-dir /shared/rpo/runs/first --python /shared/rpo/.venv/bin/python --time 2-00:00:00",
    )


if __name__ == "__main__":
    if sys.argv[1:] == ["example"]:
        EXAMPLE.parent.mkdir(parents=True, exist_ok=True)
        EXAMPLE.write_text(example_script())
        print(f"wrote {EXAMPLE}")
    else:
        print("usage: python -m services.cluster.slurm example", file=sys.stderr)
        sys.exit(2)
