"""Benchmark results: metric arithmetic from fake outputs/stats, the result schema, JSON, and a
runner pass over a fake engine."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

from ssd.benchmark import results, runner
from ssd.benchmark.cli import parse_args
from ssd.benchmark.results import (METRIC_NAMES, ArmResult, BatchRun, build_result, collect_env,
                                   compute_metrics, outputs_as_records, write_result_json)
from ssd.benchmark.summary import RANDOM_ACCEPTANCE, THROUGHPUT_NOTE, format_summary


@dataclass
class FakeStats:
    prefill_time_s: float
    decode_time_s: float
    decode_tokens: int
    num_rounds: int
    acceptance_length: float | None = None
    per_position_acceptance: list = field(default_factory=list)
    draft_round_ms: float | None = None
    verify_ms: float | None = None
    cache_hit_rate: float | None = None


def fake_output(prompt_len: int, tokens: list[int], ttft: float, tpot: float, e2e: float):
    return SimpleNamespace(prompt_token_ids=list(range(prompt_len)), token_ids=tokens, text="",
                           finish_reason="length", metrics=SimpleNamespace(ttft_s=ttft, tpot_s=tpot, e2e_s=e2e))


def spec_runs() -> list[BatchRun]:
    first = BatchRun("sync", 0, [0, 1], [fake_output(5, [1, 2, 3, 4], 0.1, 0.02, 0.2),
                                         fake_output(7, [5, 6, 7, 8], 0.3, 0.04, 0.5)],
                     FakeStats(0.5, 2.0, 6, 2, 3.0, [0.9, 0.5], 10.0, 20.0), wall_s=3.0)
    second = BatchRun("sync", 1, [2], [fake_output(3, [9, 9, 9, 9, 9, 9], 0.2, 0.03, 0.4)],
                      FakeStats(0.25, 1.0, 5, 6, 1.0, [0.3], 4.0, 8.0), wall_s=1.5)
    return [first, second]


def test_metrics_computed_from_outputs_and_stats():
    m = compute_metrics(spec_runs())
    assert set(m) == set(METRIC_NAMES)
    assert (m["num_requests"], m["prompt_tokens"], m["generated_tokens"], m["decode_tokens"]) == (3, 15, 14, 11)
    assert m["decode_tok_s"] == pytest.approx(11 / 3.0)  # decode tokens / decode time: no prefill
    assert m["e2e_tok_s"] == pytest.approx(14 / 4.5)  # all generated tokens / wall time
    assert (m["ttft_s"], m["tpot_s"], m["e2e_latency_s"]) == (0.2, 0.03, 0.4)  # medians
    assert m["num_rounds"] == 8
    assert m["acceptance_length"] == pytest.approx((3.0 * 2 + 1.0 * 6) / 8)  # weighted by rounds
    assert m["draft_round_ms"] == pytest.approx((10 * 2 + 4 * 6) / 8)
    assert m["round_ms"] == pytest.approx(1000 * 3.0 / 8)   # decode time per round
    assert m["round_over_verify"] == pytest.approx(m["round_ms"] / ((20 * 2 + 8 * 6) / 8))
    assert m["per_position_acceptance"] == pytest.approx([(0.9 * 2 + 0.3 * 6) / 8, 0.5])
    assert m["cache_hit_rate"] is None  # not async


def test_autoregressive_metrics_have_no_spec_stats():
    run = BatchRun("ar", 0, [0], [fake_output(4, [1, 2, 3], 0.1, 0.05, 0.2)],
                   SimpleNamespace(prefill_time_s=0.1, decode_time_s=0.1, decode_tokens=2, num_rounds=2),
                   wall_s=0.25)
    m = compute_metrics([run])
    assert m["decode_tok_s"] == pytest.approx(20.0)
    assert m["round_ms"] == pytest.approx(50.0)   # a decode step
    for name in ("acceptance_length", "per_position_acceptance", "draft_round_ms", "verify_ms", "round_over_verify",
                 "cache_hit_rate"):
        assert m[name] is None


def test_outputs_records_are_in_prompt_order():
    runs = list(reversed(spec_runs()))
    assert [r["prompt_index"] for r in outputs_as_records(runs)] == [0, 1, 2]
    assert outputs_as_records(runs)[2]["token_ids"] == [9] * 6


def result_for(argv: list[str]) -> dict:
    config = parse_args(["--device", "cpu"] + argv)
    runs = spec_runs()
    arm = ArmResult("sync", compute_metrics(runs), outputs_as_records(runs))
    return build_result(config, [arm], env={"python": "3.11"})


def test_result_schema_has_required_keys():
    result = result_for(["--spec"])
    assert {"config", "env", "metrics", "simulated_acceptance", "outputs", "arms", "ab"} <= set(result)
    for name in ("decode_tok_s", "e2e_tok_s", "ttft_s", "tpot_s", "acceptance_length",
                 "per_position_acceptance", "cache_hit_rate", "draft_round_ms", "verify_ms"):
        assert name in result["metrics"]
    assert set(result["outputs"][0]) >= {"prompt_index", "token_ids"}
    assert result["config"]["target"]["name"] == "qwen2.5-coder-1.5b"
    assert result["config"]["target_tp_size"] == 1
    assert result["simulated_acceptance"] is False


def test_profile_replay_is_flagged_in_result_and_summary():
    result = result_for(["--random-weights", "--spec", "--profile", "gsm"])
    assert result["simulated_acceptance"] is True
    text = format_summary({"sync": result["metrics"]}, simulated=True)
    assert "(simulated acceptance)" in text and THROUGHPUT_NOTE in text


def test_random_weights_without_a_profile_are_flagged_in_result_and_summary():
    """Speculation over random weights with no replayed profile measures chance agreement only."""
    result = result_for(["--random-weights", "--spec"])
    assert result["random_acceptance"] is True and result["simulated_acceptance"] is False
    assert RANDOM_ACCEPTANCE in format_summary({"sync": result["metrics"]}, random_acceptance=True)
    assert result_for(["--random-weights", "--spec", "--profile", "gsm"])["random_acceptance"] is False
    assert result_for(["--spec"])["random_acceptance"] is False          # the real offline pair


def test_json_round_trip(tmp_path):
    result = result_for(["--spec"])
    path = write_result_json(result, tmp_path / "out" / "result.json")
    assert json.loads(path.read_text()) == json.loads(json.dumps(result))


def test_env_has_versions_and_git():
    env = collect_env()
    for key in ("python", "torch", "transformers", "ssd", "git_commit", "git_dirty", "hostname",
                "device_count", "device_names", "cuda_version"):
        assert key in env
    json.dumps(env)


def test_a_copy_without_git_names_its_commit_from_the_environment(monkeypatch):
    """A lent GPU machine gets the working tree without .git: the run names the commit it was sent."""
    monkeypatch.setattr(results, "_git", lambda *args: None)
    monkeypatch.setenv("SSD_GIT_COMMIT", "e98ab49")
    env = collect_env()
    assert env["git_commit"] == "e98ab49" and env["git_dirty"] is None


def test_the_commit_named_in_the_environment_wins_over_the_checkouts(monkeypatch):
    """The copy on a lent GPU machine may carry a .git whose HEAD is older than the files sent (seen
    2026-12-05: result files named the session's first commit)."""
    monkeypatch.setattr(results, "_git", lambda *args: "b460964" if args[0] == "rev-parse" else "")
    monkeypatch.setenv("SSD_GIT_COMMIT", "ae68dca")
    assert collect_env()["git_commit"] == "ae68dca"
    monkeypatch.delenv("SSD_GIT_COMMIT")
    assert collect_env()["git_commit"] == "b460964"


def test_summary_table_is_fixed_width_and_shows_missing_as_dash():
    m = compute_metrics(spec_runs())
    text = format_summary({"ar": {**m, "acceptance_length": None}, "sync": m})
    rows = [line for line in text.splitlines() if line.startswith("acceptance length")]
    assert rows and " - " in rows[0] + " "
    assert "decode tok/s (no prefill)" in text


# ---------------------------------------------------------------- runner over a fake engine

class FakeLLM:
    """Greedy 'model': echoes a deterministic token sequence; spec arms report acceptance."""

    def __init__(self, model, **kwargs):
        self.kwargs = kwargs
        self.last_run_stats = None
        self.shut = False
        self.tokenizer = object()
        self.runner = type("Runner", (), {"arch": type("Arch", (), {"vocab_size": 1000})})()

    def generate(self, prompts, sampling_params, use_tqdm=True, mode=None):
        outs = [fake_output(len(p), [len(p) + i for i in range(sp.max_tokens)], 0.01, 0.001, 0.02)
                for p, sp in zip(prompts, sampling_params)]
        spec = mode != "ar" and self.kwargs.get("num_speculative_tokens", 0) > 0
        decode_tokens = sum(sp.max_tokens - 1 for sp in sampling_params)
        self.last_run_stats = FakeStats(0.01, 0.1 if spec else 0.2, decode_tokens, 4,
                                        2.5 if spec else None, [0.8, 0.6] if spec else [])
        return outs

    def make_sequences(self, prompts, sampling_params):  # the engine's fit check: everything fits here
        return list(prompts)

    def shutdown(self):
        self.shut = True


def test_run_benchmark_with_a_fake_engine(monkeypatch, tmp_path):
    built: list[FakeLLM] = []

    def build(config, arm, target, draft):
        built.append(FakeLLM(target, **runner.llm_kwargs(config, arm, draft)))
        return built[-1]

    monkeypatch.setattr(runner, "build_llm", build)
    monkeypatch.setattr(runner, "resolve_model", lambda ref: ref.name if ref else None)
    monkeypatch.setattr(runner, "sampling_params_for",
                        lambda config, n: [SimpleNamespace(max_tokens=config.output_len)] * n)
    config = parse_args(["--device", "cpu", "--random", "--input_len", "8", "--numseqs", "5", "--b", "2",
                         "--output_len", "6", "--ab", "ar,sync", "--json", str(tmp_path / "r.json")])
    result = runner.run_benchmark(config)
    assert all(llm.shut for llm in built) and len(built) == 1  # one engine serves every arm
    assert built[0].kwargs["num_speculative_tokens"] == 6 and "fan_out" not in built[0].kwargs
    assert result["arms"]["ar"]["metrics"]["num_requests"] == 5
    assert result["ab"]["greedy_identical"] is True
    assert result["ab"]["comparisons"]["sync/ar"]["decode"]["ratio"] == pytest.approx(2.0)
    assert json.loads((tmp_path / "r.json").read_text())["primary_arm"] == "sync"


def test_async_spec_options_reach_the_engine():
    config = parse_args(["--device", "cpu", "--spec", "--async", "--k", "2", "--flh", "1,1,1",
                         "--x", "0.5", "--dtemp", "0.7"])
    kwargs = runner.llm_kwargs(config, config.arms[0], "draft-dir")
    assert kwargs["async_spec"] and kwargs["draft"] == "draft-dir"
    assert kwargs["fan_out_list"] == [1, 1, 1] and kwargs["sampler_x"] == 0.5
    assert kwargs["draft_temperature"] == 0.7 and "fan_out_list_miss" not in kwargs


def test_one_token_outputs_have_no_decode_ratio(tmp_path):
    """--output_len 1: every token comes from prefill; the decode ratio is undefined, not NaN, and the
    result still serialises (strict JSON)."""
    def one_token_run(arm: str) -> BatchRun:
        return BatchRun(arm, 0, [0], [fake_output(4, [7], 0.1, 0.0, 0.1)],
                        SimpleNamespace(prefill_time_s=0.1, decode_time_s=0.0, decode_tokens=0, num_rounds=0),
                        wall_s=0.1)
    from ssd.benchmark.ab import compare_arms
    comparisons = compare_arms({"ar": [one_token_run("ar")], "sync": [one_token_run("sync")]}, resamples=100)
    assert comparisons["sync/ar"]["decode"] is None and comparisons["sync/ar"]["e2e"]["ratio"] == pytest.approx(1.0)
    assert compute_metrics([one_token_run("ar")])["decode_tok_s"] is None
    assert "decode throughput ratio: - (an arm generated no tokens" in format_summary({}, comparisons=comparisons)
    path = tmp_path / "r.json"
    write_result_json({"comparisons": comparisons}, path)
    assert json.loads(path.read_text())["comparisons"]["sync/ar"]["decode"] is None
