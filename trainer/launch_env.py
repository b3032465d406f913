"""DeepSpeed's launcher for the trainer: N local ranks started by `rpo train` itself, and the variables a
multi-node trainer needs on every node, written where the launcher reads them.

Local ranks (`run_local_ranks`): `rpo train` with `train.num_processes` N > 1, outside a launcher (no
`WORLD_SIZE`), runs itself again as N ranks under DeepSpeed's launcher (`local_ranks_command`) and waits for
them, passing SIGTERM and SIGINT on, and exits with their status. This is how a compose trainer with
`RPO_TRAINER_GPUS=N` trains on its N GPUs: the ranks are placed on the GPUs this process was given
(`CUDA_VISIBLE_DEVICES`, set by its GPU claim: the first N of them, one rank each, in PCI order), or, with
none given, on `--num_gpus N` (CPU ranks with DS_ACCELERATOR=cpu). The parent keeps its GPU claim while they
run.

DeepSpeed's multi-node launchers (pdsh, the default; also OpenMPI, MPICH, Slurm...) start the ranks of other
nodes over ssh with a fresh environment: they forward only a few prefixes of the launching shell's
(PYTHON*, NCCL* on CUDA, MLFLOW*, UCX*, MV2*), so `RPO_API_TOKEN` and every `RPO_<SECTION>__<FIELD>` would
be missing there (ranks would push weights without the token and get 401). The launcher also reads a file,
`.deepspeed_env` (name overridable with `DS_ENV_FILE`) in the home directory and in the directory it is run
from, one `NAME=VALUE` a line, and exports each of them on every node (`deepspeed/launcher/runner.py`).

Guarantees of `write_deepspeed_env(path, environ)`:
- it writes every `RPO_*` and `NCCL_*` variable of `environ`, and `DS_ACCELERATOR`, sorted by name, in that
  format, and nothing else;
- the file has mode 0600 from the moment it exists (it holds the API token), and replaces any earlier one
  atomically;
- a value the launcher would not carry through unchanged is refused with a ValueError naming the variable
  and the problem, never the value (it may be a secret): a line break (the file is read line by line),
  leading or trailing white space (the launcher strips it), or `"`, `$`, a backquote or a backslash (the
  launcher wraps such values in double quotes, unescaped, on the remote shell's command line).

`python -m trainer.launch_env [PATH]` writes the current environment's variables to PATH (default: the file
the launcher reads in the current directory) and prints their names.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

log = logging.getLogger("rpo.train")

PREFIXES = ("RPO_", "NCCL_")
"""Variables forwarded by prefix: the run's settings and token, and NCCL's network settings."""
NAMES = ("DS_ACCELERATOR", "CUDA_DEVICE_ORDER", "PYTORCH_NVML_BASED_CUDA_CHECK")
"""Variables forwarded by exact name (GPU numbering as nvidia-smi's, and torch's fork-safe CUDA check)."""
ENV_FILE_NAME = "DS_ENV_FILE"
"""The variable DeepSpeed's launcher reads the file's name from (default `.deepspeed_env`)."""
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_UNSAFE = {'"': "a double quote", "$": "a dollar sign", "`": "a backquote", "\\": "a backslash"}


def forwarded(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables of `environ` the trainer's ranks need on every node, by name."""
    return {
        name: value for name, value in sorted(environ.items()) if name.startswith(PREFIXES) or name in NAMES
    }


def check_value(name: str, value: str) -> None:
    """Raise ValueError when DeepSpeed's launcher would not deliver `value` unchanged (the message names the
    variable and the problem, not the value)."""
    if not _NAME.fullmatch(name):
        raise ValueError(f"{name!r} is not a shell variable name; DeepSpeed's launcher cannot export it")
    if "\n" in value or "\r" in value:
        raise ValueError(f"{name} contains a line break; .deepspeed_env holds one NAME=VALUE per line")
    if value != value.strip():
        raise ValueError(
            f"{name} starts or ends with white space, which DeepSpeed's launcher strips from the value"
        )
    for char, what in _UNSAFE.items():
        if char in value:
            raise ValueError(
                f"{name} contains {what}: DeepSpeed's launcher puts the value in double quotes on the remote "
                "shell's command line without escaping it; choose a value without it"
            )


def default_path() -> Path:
    """The file DeepSpeed's launcher reads in the current directory."""
    return Path(os.environ.get(ENV_FILE_NAME, ".deepspeed_env"))


def write_deepspeed_env(path: str | Path, environ: Mapping[str, str]) -> list[str]:
    """Write the forwarded variables of `environ` to `path` (mode 0600); returns their names."""
    chosen = forwarded(environ)
    for name, value in chosen.items():
        check_value(name, value)
    path = Path(path)
    text = "".join(f"{name}={value}\n" for name, value in chosen.items())
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # mode 0600
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return list(chosen)


def local_ranks_command(
    n: int, argv: Sequence[str], environ: Mapping[str, str], master_port: int
) -> tuple[list[str], dict[str, str]]:
    """The command and environment that run `rpo <argv>` as `n` ranks on this machine under DeepSpeed's
    launcher: on the first `n` GPUs of `CUDA_VISIBLE_DEVICES` when it names some (the launcher then places
    one rank on each), else (or with DS_ACCELERATOR=cpu) on `--num_gpus n`. Raises ValueError when fewer than `n` GPUs are given."""
    env = dict(environ)
    cmd = [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--no_local_rank",
        "--master_port",
        str(master_port),
    ]
    visible = [d.strip() for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if visible and env.get("DS_ACCELERATOR") != "cpu":  # CPU ranks use no GPU, whatever is visible
        if len(visible) < n:
            raise ValueError(
                f"train.num_processes is {n}, but this trainer was given {len(visible)} GPU(s) "
                f"(CUDA_VISIBLE_DEVICES={','.join(visible)}): set gpus.trainer (RPO_TRAINER_GPUS) to {n}"
            )
        env["CUDA_VISIBLE_DEVICES"] = ",".join(visible[:n])
    else:
        cmd += ["--num_gpus", str(n)]
    return [*cmd, "--module", "services.cli", *argv], env


def run_local_ranks(n: int, argv: Sequence[str]) -> int:
    """Run `rpo <argv>` as `n` local ranks (`local_ranks_command`) until they end; SIGTERM and SIGINT sent to
    this process go to the launcher, which passes them to the ranks. Returns the launcher's exit status."""
    with socket.socket() as probe:  # the ranks' rendezvous, on a port free now
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cmd, env = local_ranks_command(n, argv, os.environ, port)
    devices = env.get("CUDA_VISIBLE_DEVICES")
    log.info(
        "rpo train: %d ranks under DeepSpeed's launcher (%s)",
        n,
        f"GPUs {devices}" if devices else "--num_gpus",
    )
    launcher = subprocess.Popen(cmd, env=env)
    forwarded = (signal.SIGTERM, signal.SIGINT)
    previous = {sig: signal.signal(sig, lambda sig, _frame: launcher.send_signal(sig)) for sig in forwarded}
    try:
        return launcher.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str]) -> int:
    if len(argv) > 1 or (argv and argv[0].startswith("-")):
        print("usage: python -m trainer.launch_env [PATH]   (default: ./.deepspeed_env)", file=sys.stderr)
        return 2
    path = Path(argv[0]) if argv else default_path()
    try:
        names = write_deepspeed_env(path, os.environ)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {len(names)} variable(s) to {path} (mode 0600): {' '.join(names) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
