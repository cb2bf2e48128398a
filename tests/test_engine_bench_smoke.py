"""CPU smoke test of bench/engine_bench.py: its pure pieces, with fake timings (no CUDA, no model)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "engine_bench.py"


@pytest.fixture(scope="module")
def eb():
    spec = importlib.util.spec_from_file_location("engine_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["engine_bench"] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


LLAMA_8B = SimpleNamespace(hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                           num_kv_heads=8, head_dim=128, vocab_size=128256)


def fake_timer(ms_by_call):
    """A Timer returning fixed per-iteration times; calls fn once so it is exercised."""
    def timer(fn, warmup, iters):
        fn()
        return [ms_by_call] * iters
    return timer


def test_percentiles_and_summary(eb):
    s = eb.summarize_ms([float(x) for x in range(1, 12)])  # 1..11
    assert s["median_ms"] == 6 and s["p10_ms"] == 2 and s["p90_ms"] == 10 and s["n"] == 11
    assert eb.percentile([5.0], 90) == 5.0


def test_nominal_bandwidth_from_device_name(eb):
    assert eb.nominal_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12
    assert eb.nominal_bandwidth("NVIDIA H200") == 4.8e12
    assert eb.nominal_bandwidth("NVIDIA H100 PCIe") == 2.0e12
    assert eb.nominal_bandwidth("cpu") is None


def test_roofline_math(eb):
    weight_bytes = 16.06e9
    refs = eb.Refs(nominal_Bps=3.35e12, copy_Bps=3.0e12)
    roof = eb.roofline_times(weight_bytes, refs)
    assert roof["nominal_step_ms"] == pytest.approx(4.794, rel=1e-3)  # ~208 tok/s at B=1
    fields = eb.bandwidth_fields(weight_bytes, roof["nominal_step_ms"] / 1e3, refs)
    assert fields["frac_of_nominal"] == pytest.approx(1.0)
    assert fields["frac_of_copy"] == pytest.approx(3.35 / 3.0)
    assert eb.bandwidth_fields(1e9, 1.0, eb.Refs())["frac_of_nominal"] is None


def test_linear_shapes_and_streamed_bytes(eb):
    shapes = eb.linear_shapes(LLAMA_8B)
    assert len(shapes) == 4 * 32 + 1 and shapes[0] == (6144, 4096) and shapes[-1] == (128256, 4096)
    # llama-3.1-8b: 16.06 GB of weights, minus the 1.05 GB embedding table and the norms
    assert eb.streamed_bytes(LLAMA_8B) == pytest.approx(15.01e9, rel=1e-3)
    assert eb.attend_bucket(513, 1024) == 1024 and eb.attend_bucket(10, 1024) == 256
    assert eb.attend_bucket(3000, 1024) == 1024


def test_forward_schema_with_fake_timer(eb, tmp_path):
    cfg = eb.BenchConfig(presets=("p",), variants=("compile",), out=tmp_path / "r.json", device="cpu",
                         iters=5, warmup=1, synced_iters=3)
    refs = eb.Refs(nominal_Bps=3.35e12, copy_Bps=3.0e12)
    arch = SimpleNamespace(**vars(LLAMA_8B) | {"vocab_size": 100}, weight_bytes=lambda: 16_000_000_000)
    runner = SimpleNamespace(arch=arch,
                             device="cpu", graphs=None, attend_bucket=lambda n: eb.attend_bucket(n, 1024),
                             forward=lambda ids, pos, max_position: ids.float())
    timers = eb.Timers(fake_timer(5.0), fake_timer(6.0))
    records = [eb.forward_case(runner, b, w, cfg, timers, refs) for w in (1, 8) for b in (1, 16)]
    r = records[0]
    assert r["tok_s"] == pytest.approx(200.0) and r["achieved_GBps"] == pytest.approx(3200.0)
    assert r["frac_of_nominal"] == pytest.approx(3200 / 3350) and r["synced"]["median_ms"] == 6.0
    assert r["attend_len"] == 1024 and r["graph_replay"] is False
    assert eb.window_ratios(records, 8) == {"1": 1.0, "16": 1.0}
    json.dumps(records)


def test_generate_record(eb):
    stats = {"decode_tok_s": 200.0, "decode_time_s": 1.275, "decode_tokens": 255, "num_rounds": 255,
             "prefill_time_s": 0.1, "prefill_tokens": 128}
    r = eb.generate_record(1, stats, 1.4, 16_000_000_000, eb.Refs(nominal_Bps=3.2e12))
    assert r["step_ms"] == pytest.approx(5.0) and r["frac_of_nominal"] == pytest.approx(1.0)
    assert r["roofline_tok_s"] == pytest.approx(200.0)


def test_recorder_records_errors_and_skips_past_budget(eb, tmp_path):
    clock = [0.0]
    out = tmp_path / "r.json"
    rec = eb.Recorder(eb.Budget(10.0, clock=lambda: clock[0]), out)
    assert rec.run("ok_case", lambda: {"x": 1}, preset="p") == {"x": 1}
    assert rec.run("bad_case", lambda: 1 / 0, preset="p") is None
    assert rec.run("big_build", lambda: 1, need_s=30.0, preset="p") is None  # 10 s left < 30 s needed
    clock[0] = 11.0
    assert rec.run("late_case", lambda: 1, preset="p") is None
    cases = json.loads(out.read_text())["cases"]
    assert [c["status"] for c in cases] == ["ok", "error", "skipped", "skipped"]
    assert cases[1]["error"].startswith("ZeroDivisionError") and "budget" in cases[3]["reason"]


def test_summary_from_cases(eb):
    fwd = lambda b, w, ms: {"case": "forward", "preset": "p", "variant": "compile", "status": "ok",  # noqa: E731
                            "result": {"batch": b, "width": w, "device": {"median_ms": ms},
                                       "frac_of_nominal": 0.5}}
    gen = {"case": "generate", "preset": "p", "variant": "compile", "status": "ok",
           "result": {"batch": 1, "decode_tok_s": 100.0, "frac_of_nominal": 0.4}}
    cases = [fwd(1, 1, 5.0), fwd(1, 8, 6.0), gen, {"case": "copy_bandwidth", "status": "ok", "result": {}},
             {"case": "forward", "preset": "p", "variant": "compile", "status": "error"}]
    s = eb.summarize_cases(cases, 8)["p"]["compile"]
    assert s["window_over_decode"] == {"1": pytest.approx(1.2)} and s["generate_decode_tok_s"] == {"B1": 100.0}
    assert s["forward_ms"] == {"B1xT1": 5.0, "B1xT8": 6.0}


def test_cli_defaults(eb, tmp_path):
    cfg = eb.parse_args(["--presets", "llama-3.1-8b", "qwen3-32b", "--out", str(tmp_path / "e.json")])
    assert cfg.presets == ("llama-3.1-8b", "qwen3-32b") and cfg.variants == ("compile", "nocompile", "eager")
    assert cfg.budget_s == 420.0 and cfg.batches == (1, 2, 4, 8, 16) and cfg.max_model_len == 1024
    assert [c for c in eb.forward_cells(eb.VARIANTS[2], cfg)] == [(1, 1)]
    assert len(eb.forward_cells(eb.VARIANTS[0], cfg)) == 10
