"""What `rpo train` checks before it loads a model or starts DeepSpeed, so a wrong setting or a missing
service is one message naming it (exit 2) within seconds, not a `[rank0]` traceback minutes later:
the model path, the dataset, a replica to ask for rollouts, and (RPO mode) the cache server, each of them
answering; on a GPU machine, that the memory plan fits (`rpo plan`).
"""

from __future__ import annotations

import httpx

from services.core.cli_args import UsageError
from services.core.clients.rollout import discover_replicas
from services.core.config import RunConfig
from services.core.data import DatasetError
from services.core.data_roles import choose_dataset, training_questions
from services.core.gpu_box import detect_box
from services.core.model_fit import check_fit
from services.models.fit_plan import plan_or_refuse
from services.models.model_path import resolve_model_path

PROBE_SECONDS = 5.0


def _answers(url: str) -> str | None:
    """None when `url` answers at all (any HTTP status), else why not."""
    try:
        httpx.get(url, timeout=PROBE_SECONDS)
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return None


def check_before_training(cfg: RunConfig) -> None:
    """Raise UsageError naming the first thing that would make the run fail."""
    if cfg.rollout.sleep_mode and cfg.train.max_lag:
        raise UsageError(
            "rollout.sleep_mode puts the replicas' engines to sleep during the learner step, and train.max_lag 1 "
            "rolls the next step out during it: use one or the other"
        )
    s = cfg.services
    if cfg.algorithm.mode == "rpo":
        if not s.cache_url:
            raise UsageError(
                "no cache server configured: set services.cache_url (RPO keeps its experience cache there; "
                "`rpo serve cache` starts one), or run full-path with --set algorithm.mode=full"
            )
        why = _answers(s.cache_url.rstrip("/") + "/readyz")
        if why is not None:
            raise UsageError(f"the cache server at {s.cache_url} (services.cache_url) does not answer: {why}")
    if not s.rollout_urls and not s.rollout_discovery:
        raise UsageError(
            "no rollout replica configured: set services.rollout_urls (e.g. [http://127.0.0.1:8200], "
            "`rpo serve rollout` starts one) or services.rollout_discovery (dns://host:port)"
        )
    try:
        replicas = discover_replicas(cfg)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if not replicas:
        raise UsageError(f"services.rollout_discovery {s.rollout_discovery} resolves to no address")
    failures = {url: _answers(url + "/v1/weights/version") for url in replicas}
    if all(failures.values()):
        listed = "; ".join(f"{url}: {why}" for url, why in failures.items())
        raise UsageError(f"no rollout replica answers ({listed}): start one with `rpo serve rollout`")
    try:  # the datasets, then the model (a built-in one may be built here, the first time)
        training_questions(cfg.data)
        choose_dataset("eval", cfg.data)  # `eval_dataset: auto` with nothing to evaluate on is refused here
        check_fit(cfg, resolve_model_path(cfg.model.path, cfg.model.revision))
    except (ValueError, DatasetError) as exc:
        raise UsageError(str(exc)) from None
    plan_or_refuse(cfg, detect_box())  # on a GPU: the memory plan fits (else what would, as `rpo plan`)
