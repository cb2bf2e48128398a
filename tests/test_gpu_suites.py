"""The multi-GPU suites (scripts/gpu/) build command lines their tools accept: each part runs with
`python` replaced by a recorder, and every recorded bench.py / tp_profile.py command goes through its
parser (GPUs faked as visible). Device time is scarce: a mistyped flag must not cost a call."""
import importlib.util
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import ssd.benchmark.cli as bench_cli

REPO_ROOT = Path(__file__).resolve().parents[1]


def recorded_runs(tmp_path: Path, suite: str, *args: str, **env: str) -> list[list[str]]:
    """What `scripts/gpu/SUITE OUT ARGS...` runs with `python`: [working directory, *arguments] each."""
    fake_bin, log, out = tmp_path / "bin", tmp_path / f"{args[0]}.jsonl", tmp_path / "out"
    fake_bin.mkdir(exist_ok=True)
    out.mkdir(exist_ok=True)
    recorder = fake_bin / "python"
    recorder.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                        f"open({str(log)!r}, 'a').write(json.dumps([os.getcwd(), *sys.argv[1:]]) + '\\n')\n")
    recorder.chmod(recorder.stat().st_mode | stat.S_IEXEC)
    # exit status: the suite's last grep finds no result lines in the empty logs (1): not checked
    subprocess.run(["bash", f"scripts/gpu/{suite}", str(out), *args], cwd=REPO_ROOT, capture_output=True,
                   env={**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}", **env})
    return [json.loads(line) for line in log.read_text().splitlines()]


def recorded_commands(tmp_path: Path, suite: str, *args: str, **env: str) -> list[list[str]]:
    return [run[1:] for run in recorded_runs(tmp_path, suite, *args, **env)]


def tp_profile_parser():
    spec = importlib.util.spec_from_file_location("tp_profile", REPO_ROOT / "bench" / "tp_profile.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.parse_args


@pytest.fixture
def bench_configs(monkeypatch):
    monkeypatch.setattr(bench_cli, "_visible_gpu_count", lambda: 8)
    return lambda commands: [bench_cli.parse_args(argv[1:]) for argv in commands if argv[0] == "bench/bench.py"]


def test_issue6_runs_parse_with_tp4_and_the_draft_on_a_fifth_gpu(tmp_path, bench_configs):
    commands = recorded_commands(tmp_path, "tp_suite.sh", "ab-tp4-70b", KS="6 7", FANOUTS="uniform geometric",
                                 DRAFT_FLAGS="--draft-quant fp8 --draft-vocab 32768")
    configs = bench_configs(commands)
    assert len(configs) == 12
    assert {(c.k, c.fanout, c.batch_size) for c in configs} == {
        (k, f, b) for k in (6, 7) for f in ("uniform", "geometric") for b in (1, 4, 16)}
    for config in configs:
        assert [a.name for a in config.arms] == ["ar", "sync", "async"] and config.target_tp_size == 4
        assert config.target.name == "llama-3.1-70b" and config.draft.name == "llama-3.2-1b"
        assert config.simulated_acceptance and config.draft_quant == "fp8" and config.draft_vocab == 32768
    parse = tp_profile_parser()
    match = [parse(argv[1:]) for argv in recorded_commands(tmp_path, "tp_suite.sh", "tp-match")]
    assert [(a.model, a.tp) for a in match] == [("llama-3.1-8b", [1, 4])]


@pytest.mark.parametrize("part, target, draft", [("ab-tp2-llama", "llama-3.1-70b", "llama-3.2-1b"),
                                                 ("ab-tp2-qwen", "qwen3-32b", "qwen3-0.6b")])
def test_issue7_runs_parse_with_tp2_and_the_draft_on_a_third_gpu(tmp_path, bench_configs, part, target, draft):
    configs = bench_configs(recorded_commands(tmp_path, "tp_suite.sh", part))
    assert [c.batch_size for c in configs] == [1, 16]
    assert all(c.target_tp_size == 2 and c.gpus == 3 and c.target.name == target and c.draft.name == draft
               for c in configs)


def test_two_gpu_runs_parse(tmp_path, bench_configs):
    configs = bench_configs(recorded_commands(tmp_path, "h200x2_suite.sh", "ab-qwen", BATCHES="1 4 16"))
    assert [(c.batch_size, c.target_tp_size) for c in configs] == [(1, 1), (4, 1), (16, 1)]
    colocated, = bench_configs(recorded_commands(tmp_path, "h200x2_suite.sh", "ab-qwen-colocated"))
    assert colocated.arms[-1].colocated


def test_ab_baseline_alternates_the_trees_and_names_each_runs_output(tmp_path):
    baseline = tmp_path / "baseline"
    baseline.mkdir()
    runs = recorded_runs(tmp_path, "ab_baseline.sh", str(baseline), "2", "python", "bench/draft_round_bench.py",
                         "--iters", "5", "--out", "{out}")
    out = tmp_path / "out"
    assert [(Path(cwd), argv[-1]) for cwd, *argv in runs] == [
        (REPO_ROOT, str(out / "head_1.json")), (baseline, str(out / "base_1.json")),
        (REPO_ROOT, str(out / "head_2.json")), (baseline, str(out / "base_2.json"))]
    assert all(argv[:3] == ["bench/draft_round_bench.py", "--iters", "5"] for _, *argv in runs)
