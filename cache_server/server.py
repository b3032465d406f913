"""`rpo serve cache`: parse the config, start the embedded Redis when no URL is set, serve until stopped.

On SIGTERM or Ctrl-C uvicorn finishes in-flight requests, the app closes its Redis pool, then the embedded
Redis (if any) is stopped with its AOF flushed.
"""

from __future__ import annotations

import argparse
import contextlib
import logging

from cache_server.app import create_app
from cache_server.embedded import embedded_redis
from services.core.cli_args import UsageError, config_from_args
from services.core.server_kit import run_uvicorn

log = logging.getLogger("rpo.cache")


def serve_main(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    settings = config.cache_server
    with contextlib.ExitStack() as stack:
        redis_url = config.services.redis_url
        if redis_url is None:
            try:
                server = stack.enter_context(
                    embedded_redis(
                        settings.data_dir, start_timeout_seconds=settings.embedded_start_timeout_seconds
                    )
                )
            except RuntimeError as exc:
                raise UsageError(str(exc)) from None
            redis_url = server.url
        app = create_app(config, redis_url=redis_url)
        log.info(
            "cache server on http://%s:%d (run namespace prefix %r)",
            settings.host,
            settings.port,
            settings.key_prefix,
        )
        run_uvicorn(app, settings.host, settings.port)
    return 0
