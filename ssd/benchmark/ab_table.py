"""One Markdown table from bench.py result files (--json), a row per file: the numbers the GPU issues
ask to report side by side (tok/s of each arm, async/sync and async/AR, draft round, verify and round
time, the cache hit rate).

    python -m ssd.benchmark.ab_table results/ab_llama70b_tp4_*.json

Ratios are the paired estimates of an --ab run where it has them (its first arm is the baseline:
--ab ar,sync,async gives async/AR; async/sync is then the quotient of the decode tok/s), else quotients."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

COLUMNS = ("file", "GPUs", "target + draft", "TP", "B", "K", "fan-out", "AR tok/s", "sync tok/s", "async tok/s",
           "async/sync", "async/AR", "draft round ms", "verify ms", "async round ms", "round/verify", "hit rate",
           "acceptance")


def _fmt(value: Any, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _decode_ratio(result: dict, arm: str, baseline: str) -> float | None:
    """The --ab run's paired decode ratio arm/baseline, else the quotient of the arms' decode tok/s."""
    paired = ((result.get("ab") or {}).get("comparisons") or {}).get(f"{arm}/{baseline}") or {}
    if (paired.get("decode") or {}).get("ratio") is not None:
        return paired["decode"]["ratio"]
    arms = result.get("arms") or {}
    top, bottom = (arms.get(name, {}).get("metrics", {}).get("decode_tok_s") for name in (arm, baseline))
    return top / bottom if top and bottom else None


def _fan_out(config: dict) -> str:
    if config.get("flh"):
        return "flh " + ",".join(map(str, config["flh"]))
    return f"{config.get('fanout', 'uniform')} F={config.get('f')}"


def table_row(path: Path, result: dict) -> list[str]:
    config, arms = result["config"], result.get("arms") or {}
    metric = lambda arm, name: arms.get(arm, {}).get("metrics", {}).get(name)  # noqa: E731
    spec_arm = "async" if "async" in arms else "sync"
    names = result.get("env", {}).get("device_names") or []
    gpus = f"{len(names)}x {names[0].removeprefix('NVIDIA ')}" if names else "cpu"
    draft = (config.get("draft") or {}).get("name")
    acceptance = "simulated" if result.get("simulated_acceptance") else \
        "random weights: meaningless" if config.get("random_weights") and draft else "real"
    return [path.stem, gpus, config["target"]["name"] + (f" + {draft}" if draft else ""),
            str(config.get("target_tp_size")), str(config["batch_size"]), str(config["k"]), _fan_out(config),
            _fmt(metric("ar", "decode_tok_s"), 1), _fmt(metric("sync", "decode_tok_s"), 1),
            _fmt(metric("async", "decode_tok_s"), 1), _fmt(_decode_ratio(result, "async", "sync"), 3),
            _fmt(_decode_ratio(result, "async", "ar"), 3), _fmt(metric(spec_arm, "draft_round_ms")),
            _fmt(metric(spec_arm, "verify_ms")), _fmt(metric("async", "round_ms")),
            _fmt(metric("async", "round_over_verify"), 3), _fmt(metric("async", "cache_hit_rate"), 3), acceptance]


def markdown_table(paths: list[Path]) -> str:
    rows = [table_row(path, json.loads(path.read_text())) for path in paths]
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", type=Path, help="bench.py --json result files")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.files if not p.is_file()]
    if missing:
        parser.error(f"no such result file: {', '.join(missing)}")
    try:
        sys.stdout.write(markdown_table(args.files) + "\n")   # the table is the output
    except (json.JSONDecodeError, KeyError) as error:
        parser.error(f"not a bench.py result file ({type(error).__name__}: {error})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
