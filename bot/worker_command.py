"""``musicgen-bot worker``: a generation worker process, one per GPU, on any machine that
reaches the bot's PostgreSQL database. It never imports discord.py: it only claims jobs,
generates, and records what happened; the gateway talks to Discord."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Sequence

from generation.jobs.scheduling import BatchPolicy

from .config import Config

log = logging.getLogger(__name__)

NEEDS_POSTGRES = (
    "storage.database must be a postgresql:// address: a gateway and its workers share it. "
    "With an SQLite file, `musicgen-bot run` generates in the bot's own process."
)


def add_worker_command(
    commands: argparse._SubParsersAction,
    add_config: Callable[[argparse.ArgumentParser], None],
    handler: Callable[[argparse.Namespace], int],
) -> None:
    parser = commands.add_parser(
        "worker",
        help="generate for a gateway (one per GPU, any machine reaching the database)",
        description="Claim jobs from the bot's PostgreSQL database and generate them; run one "
        "per GPU, beside `musicgen-bot gateway`.",
    )
    add_config(parser)
    parser.add_argument(
        "--device",
        help='where to run the models: "cpu", "cuda", "cuda:1"... '
        "(default: generation.device in the configuration)",
    )
    parser.add_argument(
        "--models",
        nargs="+",
        metavar="MODEL",
        help="serve only these of generation.models (default: all of them)",
    )
    parser.set_defaults(handler=handler, command_parser=parser)


def worker_settings(config: Config, device: str | None, models: Sequence[str] | None):
    """The worker's settings from the configuration and the command line.

    Raises:
        ValueError: ``models`` names a model the configuration does not enable.
    """
    from generation.jobs.serving import WorkerSettings

    generation, queue = config.generation, config.queue
    if models:
        unknown = [name for name in models if name not in generation.models]
        if unknown:
            raise ValueError(
                f"--models: {', '.join(unknown)} is not in generation.models "
                f"({', '.join(generation.models)})."
            )
    return WorkerSettings(
        device=device or generation.device,
        models=tuple(models) if models else generation.models,
        max_duration=generation.max_duration,
        memory_budget_gb=generation.memory_budget_gb,
        precision=generation.precision,
        batch_policy=BatchPolicy(
            generation.max_batch, queue.max_model_wait, generation.batch_window
        ),
        max_attempts=queue.max_attempts,
        progress_interval=queue.progress_interval,
        job_timeout=queue.job_timeout,
        serves_any=not models,
        leases=WorkerSettings.leases_of(queue.lease_seconds),
    )


async def serve(config: Config, settings) -> None:
    """Run a worker until SIGTERM or SIGINT, then give its batch the shutdown grace."""
    from generation.jobs.serving import start_worker
    from generation.jobs.store import open_store

    store = await open_store(str(config.storage.database))
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    try:
        worker = await start_worker(store, settings)
        serving = loop.create_task(worker.serve_forever())
        await stopping.wait()
        log.info("worker=%s event=stopping", worker.id)
        await worker.stop(config.queue.shutdown_grace)
        serving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await serving
    finally:
        await store.close()
