"""`rpo cache export | import | stats`: thin command-line wrappers over `SyncCacheClient`.

They talk to a running cache server (`services.cache_url`, else the configured cache_server host:port) and
act on the run `services.run_id`. An import checks the whole file before writing anything (see
services.core.clients.cache).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from services.core.cli_args import UsageError, config_from_args, named_run_id
from services.core.clients.cache import ExportFileError, SyncCacheClient
from services.core.http_client import ServiceCallError


def export_main(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    run_id = named_run_id(config)
    with SyncCacheClient.from_config(config) as cache:
        try:
            count = cache.export_run(run_id, args.out)
        except (ServiceCallError, ExportFileError) as exc:
            raise UsageError(f"export of run {run_id!r} failed: {exc}") from None
    print(json.dumps({"run_id": run_id, "entries": count, "file": str(args.out)}))
    return 0


def import_main(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    run_id = named_run_id(config)
    if not Path(args.in_file).is_file():
        raise UsageError(f"no such file: {args.in_file}")
    with SyncCacheClient.from_config(config) as cache:
        try:
            count = cache.import_file(run_id, args.in_file)
        except (ServiceCallError, ExportFileError) as exc:
            raise UsageError(f"import into run {run_id!r} failed: {exc}") from None
    print(json.dumps({"run_id": run_id, "entries": count, "file": str(args.in_file)}))
    return 0


def stats_main(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    with SyncCacheClient.from_config(config) as cache:
        try:
            stats = cache.stats(named_run_id(config))
        except ServiceCallError as exc:
            raise UsageError(f"stats failed: {exc}") from None
    print(stats.model_dump_json())
    return 0
