"""`rpo train [--config FILE] [--resume]`: the trainer process, against running cache and rollout services.

Runs as one plain process, or as every rank under DeepSpeed's launcher (`deepspeed --no_local_rank
--num_gpus N --module services.cli train --config FILE`, a hostfile for several nodes; CPU ranks with
DS_ACCELERATOR=cpu): rank 0 talks to the services, every rank trains. Ranks other than 0 log warnings
and errors only. Exit code 0 when the planned steps are done or a stop request was honoured (a checkpoint
was saved: `--resume` continues).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from services.cli.args import config_from_args
from trainer.loop import run_training

log = logging.getLogger("rpo.train")


def train_main(args: Any) -> int:

    cfg = config_from_args(args)
    if int(os.environ.get("RANK", "0")) != 0:
        logging.getLogger().setLevel(logging.WARNING)
    outcome = run_training(cfg, resume=bool(getattr(args, "resume", False)))
    if outcome["stopped"]:
        log.info(
            "stopped at step %d of %d; `rpo train --resume` continues",
            outcome["steps"],
            outcome["total_steps"],
        )
    return 0
