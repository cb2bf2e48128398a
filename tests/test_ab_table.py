"""ssd.benchmark.ab_table: a row per bench.py result file, paired ratios preferred to quotients."""
import json

import pytest

from ssd.benchmark.ab_table import COLUMNS, main, markdown_table


def result(simulated: bool = True, paired: float | None = 1.9) -> dict:
    arms = {name: {"metrics": {"decode_tok_s": tok_s, "draft_round_ms": 4.0, "verify_ms": 20.0, "round_ms": 20.6,
                               "round_over_verify": 1.03, "cache_hit_rate": 0.8}}
            for name, tok_s in (("ar", 50.0), ("sync", 80.0), ("async", 100.0))}
    comparisons = {"async/ar": {"decode": {"ratio": paired}}} if paired else {}
    return {"config": {"target": {"name": "llama-3.1-70b"}, "draft": {"name": "llama-3.2-1b"}, "target_tp_size": 4,
                       "batch_size": 16, "k": 7, "f": 3, "fanout": "geometric", "flh": None, "random_weights": True},
            "env": {"device_names": ["NVIDIA H200"] * 5}, "simulated_acceptance": simulated, "arms": arms,
            "ab": {"comparisons": comparisons}}


def cells(tmp_path, data: dict) -> dict[str, str]:
    path = tmp_path / "run.json"
    path.write_text(json.dumps(data))
    row = markdown_table([path]).splitlines()[2]
    return dict(zip(COLUMNS, (cell.strip() for cell in row.strip("|").split("|"))))


def test_row_takes_the_paired_ratio_and_labels_simulated_acceptance(tmp_path):
    row = cells(tmp_path, result())
    assert (row["GPUs"], row["target + draft"], row["TP"], row["B"], row["K"]) == \
        ("5x H200", "llama-3.1-70b + llama-3.2-1b", "4", "16", "7")
    assert row["fan-out"] == "geometric F=3" and row["acceptance"] == "simulated"
    assert (row["async/AR"], row["async/sync"], row["round/verify"]) == ("1.900", "1.250", "1.030")


def test_without_paired_ratios_quotients_and_random_acceptance_is_labelled(tmp_path):
    row = cells(tmp_path, result(simulated=False, paired=None))
    assert row["async/AR"] == "2.000" and row["acceptance"] == "random weights: meaningless"


def test_bad_files_are_refused_in_one_line(tmp_path, capsys):
    (tmp_path / "other.json").write_text("{}")
    for path in (tmp_path / "missing.json", tmp_path / "other.json"):
        with pytest.raises(SystemExit) as exited:
            main([str(path)])
        assert exited.value.code == 2
    assert "not a bench.py result file" in capsys.readouterr().err
