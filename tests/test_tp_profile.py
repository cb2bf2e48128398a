"""bench/tp_profile.py end to end on CPU: TP = 1 and 2 (gloo) of one random-weight model."""
import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "tp_profile.py"


def load_script():
    spec = importlib.util.spec_from_file_location("tp_profile", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tp_sizes_agree_and_results_are_written(tiny_checkpoints, tmp_path):
    out = tmp_path / "tp.json"
    assert load_script().main(["--model", str(tiny_checkpoints["qwen3"]), "--tp", "1", "2", "--batch", "1", "3",
                               "--context", "9", "--tokens", "16", "--device", "cpu", "--out", str(out)]) == 0
    runs = json.loads(out.read_text())["runs"]
    assert set(runs) == {"tp1", "tp2"}
    for results in runs.values():
        assert [r["batch"] for r in results] == [1, 3]
        assert all(r["greedy_prefix_match_rate"] == 1.0 and r["decode_tok_s"] > 0 for r in results)
        assert all(len(r["tokens"]) == r["batch"] and all(len(t) == 16 for t in r["tokens"]) for r in results)
    assert runs["tp2"][0]["rank0_weight_bytes"] < runs["tp1"][0]["rank0_weight_bytes"]   # a shard
