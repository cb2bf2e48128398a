"""Benchmark the SSD engine from the command line: python bench/bench.py --help."""
from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install

from ssd.benchmark.cli import parse_args  # noqa: E402
from ssd.benchmark.datasets import DatasetError  # noqa: E402
from ssd.benchmark.runner import BenchmarkSetupError, run_benchmark  # noqa: E402
from ssd.engine.llm import WorkerDiedError  # noqa: E402
from ssd.loading.offline_models import OfflineModelError  # noqa: E402

logger = logging.getLogger("bench")


class Terminated(KeyboardInterrupt):
    """SIGTERM (scancel, a job's time limit, kill): handled as Ctrl-C is, so the engine ends its workers."""


def raise_terminated(signum, frame) -> None:
    raise Terminated


def main(argv: list[str]) -> int:
    config = parse_args(argv)
    signal.signal(signal.SIGTERM, raise_terminated)
    try:
        run_benchmark(config)
    except (DatasetError, BenchmarkSetupError, OfflineModelError, WorkerDiedError) as problem:
        logger.error("%s", problem)
        logger.debug("where it failed", exc_info=True)
        return 1
    except Terminated:
        logger.error("terminated (SIGTERM); no results written")
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        logger.error("interrupted; no results written")
        return 128 + signal.SIGINT
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stdout)
    sys.exit(main(sys.argv[1:]))
