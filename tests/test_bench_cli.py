"""Benchmark command line: refusals, --help, model resolution, defaults."""
from __future__ import annotations

import pytest

from ssd.benchmark import cli
from ssd.benchmark.cli import SIZE_PRESETS, build_parser, parse_args

CPU = ["--device", "cpu"]
CUDA = ["--device", "cuda"]


@pytest.fixture(autouse=True)
def no_visible_gpus(monkeypatch):
    """Make CUDA-flag tests independent of the GPUs of the machine running them (eight, as a node)."""
    monkeypatch.setattr(cli, "_visible_gpu_count", lambda: 8)


def refusal(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exited:
        parse_args(argv)
    assert exited.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("argv, phrase", [
    (CPU + ["--async"], "--async needs --spec"),
    (["--device", "cuda", "--gpus", "1", "--spec", "--async"], "needs a draft GPU"),
    (CUDA + ["--ab", "sync,async"], "needs a draft GPU"),
    (CPU + ["--spec", "--k", "3", "--flh", "1,2,3"], "K+1 = 4 entries"),
    (CPU + ["--spec", "--k", "2", "--flm", "1", "2"], "K+1 = 3 entries"),
    (CPU + ["--spec", "--flh", "1,-2,3"], "non-negative integers"),
    (CPU + ["--x", "0"], "--x must be in (0, 1]"),
    (CPU + ["--x", "1.5"], "--x must be in (0, 1]"),
    (CPU + ["--spec", "--k", "0"], "argument --k: must be >= 1"),
    (CPU + ["--spec", "--f", "-1"], "argument --f: must be >= 0"),
    (CPU + ["--ab", "sync,turbo"], "unknown arm(s) turbo"),
    (CPU + ["--ab", "sync"], "at least two distinct arms"),
    (CPU + ["--ab", "ar,ar"], "at least two distinct arms"),
    (CPU + ["--profile", "humaneval", "--spec"], "--profile replays acceptance over random weights"),
    (CPU + ["--random-weights", "--profile", "humaneval"], "needs --spec"),
    (CPU + ["--b", "0"], "argument --b: must be >= 1"),
    (CPU + ["--dtemp", "0.5"], "--dtemp (draft temperature) needs --spec"),
    (CPU + ["--draft-quant", "fp8"], "--draft-quant needs --spec"),
    (CPU + ["--draft-vocab", "4096"], "--draft-vocab needs --spec"),
    (CPU + ["--spec", "--draft-vocab", "0"], "--draft-vocab must be >= 1"),
    (CPU + ["--spec", "--draft-vocab-ranking", "qwen2.5"], "--draft-vocab-ranking needs --draft-vocab N"),
    (CPU + ["--size", "32"], "add --qwen"),
    (CPU + ["--qwen", "--size", "8"], "not a qwen size"),
    (CPU + ["--target", "/no/such/model"], "no such directory"),
    (CPU + ["--size", "8", "--target", "llama-3.1-8b"], "either --target or --size"),
    (CPU + ["--spec", "--draft", "42"], "neither a llama size"),
    (CPU + ["--spec", "--draft", "1"], "give --draft-path"),  # preset draft for the real default target
    (CPU + ["--random", "--gsm"], "cannot be mixed"),
    (CPU + ["--random-weights", "--chat_template"], "needs a tokenizer"),
    (CPU + ["--gpus", "0"], "argument --gpus: must be >= 1"),
    (CPU + ["--max-prefill-tokens", "0"], "argument --max-prefill-tokens: must be >= 1"),
])
def test_refusals_exit_2_with_a_helpful_message(argv, phrase, capsys):
    assert phrase in refusal(argv, capsys)


def test_spec_with_a_target_path_and_no_draft_is_refused(tmp_path, capsys):
    assert "give --draft-path" in refusal(CPU + ["--target", str(tmp_path), "--spec"], capsys)


def test_ab_arm_needing_spec_without_a_draft_is_refused(tmp_path, capsys):
    err = refusal(CPU + ["--target", str(tmp_path), "--ab", "ar,sync"], capsys)
    assert "needs a draft" in err


def test_help_works_and_mentions_every_flag(capsys):
    with pytest.raises(SystemExit) as exited:
        parse_args(["--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    flags = ["--llama", "--qwen", "--size", "--draft", "--gpus", "--spec", "--async", "--k", "--f",
             "--flh", "--flm", "--fanout", "--backup", "--x", "--b", "--numseqs", "--output_len",
             "--temp", "--dtemp", "--eager", "--all", "--humaneval", "--alpaca", "--gsm",
             "--ultrafeedback", "--random", "--chat_template", "--target", "--draft-path",
             "--random-weights", "--device", "--dataset", "--data-dir", "--json", "--ab",
             "--profile", "--seed", "--warmup"]
    for flag in flags:
        assert f"{flag} " in text or f"{flag}\n" in text, flag


def test_every_flag_has_help():
    for action in build_parser()._actions:
        assert action.help, action.option_strings


@pytest.mark.parametrize("family, size, preset", [
    ("--llama", "70", "llama-3.1-70b"), ("--llama", "8", "llama-3.1-8b"),
    ("--llama", "1", "llama-3.2-1b"), ("--qwen", "32", "qwen3-32b"), ("--qwen", "0.6", "qwen3-0.6b"),
])
def test_size_resolves_to_a_preset_with_random_weights(family, size, preset):
    config = parse_args(CPU + [family, "--size", size])
    assert config.target.name == preset and config.target.kind == "preset"
    assert config.random_weights


def test_presets_exist_in_the_engine():
    from ssd.models.presets import PRESETS
    assert {p for sizes in SIZE_PRESETS.values() for p in sizes.values()} <= set(PRESETS)


def test_spec_defaults_the_draft_to_the_family_small_model():
    assert parse_args(CUDA + ["--size", "70", "--spec"]).draft.name == "llama-3.2-1b"
    assert parse_args(CPU + ["--qwen", "--size", "32", "--spec", "--draft", "0.6"]).draft.name == "qwen3-0.6b"


def test_draft_quantization_reaches_the_engine_arguments():
    from ssd.benchmark.runner import llm_kwargs
    config = parse_args(CPU + ["--spec", "--draft-quant", "fp8"])
    assert config.draft_quant == "fp8"
    assert llm_kwargs(config, config.arms[-1], "d")["draft_quantization"] == "fp8"
    plain = parse_args(CPU + ["--spec"])
    assert "draft_quantization" not in llm_kwargs(plain, plain.arms[-1], "d")


def test_draft_vocabulary_reaches_the_engine_arguments():
    from ssd.benchmark.runner import llm_kwargs
    config = parse_args(CPU + ["--spec", "--async", "--draft-vocab", "32768", "--draft-vocab-ranking", "qwen2.5"])
    assert llm_kwargs(config, config.arms[-1], "d")["draft_vocabulary"] == 32768
    assert llm_kwargs(config, config.arms[-1], "d")["draft_vocabulary_ranking"] == "qwen2.5"
    plain = parse_args(CPU + ["--spec"])
    assert "draft_vocabulary" not in llm_kwargs(plain, plain.arms[-1], "d")


def test_default_cpu_run_is_the_offline_real_pair_and_small():
    config = parse_args(CPU + ["--spec"])
    assert (config.target.name, config.target.kind) == ("qwen2.5-coder-1.5b", "offline")
    assert (config.draft.name, config.draft.kind) == ("qwen2.5-coder-0.5b", "offline")
    assert not config.random_weights
    assert config.output_len <= 64 and config.numseqs <= 8 and config.warmup == 0


def test_default_cuda_run_is_llama_preset_with_reference_sizes():
    config = parse_args(CUDA)
    assert config.target.name == "llama-3.1-8b" and config.family == "llama"
    assert (config.numseqs, config.output_len, config.temp, config.k, config.f) == (128, 512, 0.0, 6, 3)


def test_spec_on_cuda_gives_the_draft_its_own_gpu_unless_colocated():
    config = parse_args(CUDA + ["--size", "70", "--gpus", "5", "--spec", "--async"])
    assert config.target_tp_size == 4 and config.arms[0].async_spec
    assert parse_args(CUDA + ["--gpus", "4", "--spec"]).target_tp_size == 3
    colocated = parse_args(CUDA + ["--gpus", "4", "--spec", "--colocate"])
    assert colocated.target_tp_size == 4 and colocated.arms[0].colocated
    single = parse_args(CUDA + ["--gpus", "1", "--spec"])  # sync SD on one GPU: necessarily co-located
    assert single.target_tp_size == 1 and single.arms[0].colocated


def test_colocate_refused_for_async():
    with pytest.raises(SystemExit):
        parse_args(CUDA + ["--gpus", "2", "--spec", "--async", "--colocate"])


def test_ab_arms_and_per_arm_tp():
    config = parse_args(CUDA + ["--gpus", "2", "--ab", "ar,sync,async"])
    assert config.ab and [a.name for a in config.arms] == ["ar", "sync", "async"]
    assert [a.tp_size for a in config.arms] == [1, 1, 1]  # one LLM (async layout) serves all three arms
    assert [a.tp_size for a in parse_args(CUDA + ["--gpus", "2"]).arms] == [2]  # AR alone: both GPUs
    assert config.draft is not None
    assert [a.name for a in parse_args(CPU + ["--ab"]).arms] == ["sync", "async"]


def test_fan_out_lists_accept_commas_and_spaces():
    config = parse_args(CPU + ["--spec", "--async", "--k", "2", "--flh", "3,", "2,", "1", "--flm", "0 0 1"])
    assert config.flh == (3, 2, 1) and config.flm == (0, 0, 1)


def test_target_path_and_draft_path(tmp_path):
    target, draft = tmp_path / "t", tmp_path / "d"
    target.mkdir(), draft.mkdir()
    config = parse_args(CPU + ["--target", str(target), "--draft-path", str(draft), "--spec"])
    assert config.target.kind == config.draft.kind == "path"
    assert not config.random_weights


def test_datasets_and_data_dir(monkeypatch):
    monkeypatch.setenv("SSD_DATA_DIR", "/data/sets")
    config = parse_args(CPU + ["--all", "--dataset", "my.jsonl"])
    assert config.datasets == ("humaneval", "alpaca", "gsm", "ultrafeedback", "my.jsonl")
    assert config.data_dir == "/data/sets"
    assert parse_args(CPU + ["--data-dir", "x"]).data_dir == "x"


def test_profile_with_random_weights_marks_simulated():
    config = parse_args(CPU + ["--random-weights", "--spec", "--profile", "humaneval"])
    assert config.simulated_acceptance and config.target.name == "llama-3.2-1b"


def test_more_gpus_than_visible_is_refused(monkeypatch, capsys):
    monkeypatch.setattr(cli, "_visible_gpu_count", lambda: 2)
    assert "only 2 CUDA device(s) are visible" in refusal(CUDA + ["--gpus", "4"], capsys)


def test_cuda_without_a_visible_gpu_is_refused(monkeypatch, capsys):
    monkeypatch.setattr(cli, "_visible_gpu_count", lambda: 0)
    assert "no CUDA device is visible" in refusal(CUDA, capsys)


def test_an_unwritable_result_path_is_refused_before_the_run(tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    assert "is not a directory" in refusal(CPU + ["--json", str(tmp_path / "afile" / "x.json")], capsys)
    assert "is a directory" in refusal(CPU + ["--json", str(tmp_path)], capsys)
    assert parse_args(CPU + ["--json", str(tmp_path / "new" / "x.json")]).json_path  # made when written


def test_profile_replay_refuses_sampling(capsys):
    assert "needs --temp 0" in refusal(CPU + ["--random-weights", "--spec", "--profile", "code", "--temp", "0.5"],
                                       capsys)


def test_options_of_a_mode_that_does_not_run_are_reported(caplog):
    with caplog.at_level("WARNING"):
        parse_args(CPU + ["--spec", "--f", "5", "--backup", "fast", "--colocate"])
    assert "--f --backup: options of async speculation" in caplog.text
    assert "--colocate places" not in caplog.text  # a sync arm runs: --colocate applies
    caplog.clear()
    with caplog.at_level("WARNING"):
        parse_args(CPU + ["--spec", "--async", "--f", "5", "--backup", "fast"])
        parse_args(CPU + ["--ab", "ar,async", "--x", "0.5"])
    assert not caplog.text


def test_input_len_without_random_prompts_is_reported_as_ignored(caplog):
    with caplog.at_level("WARNING"):
        config = parse_args(CPU + ["--input_len", "512"])
    assert "--input_len sets the length of --random prompts; the embedded prompts keep" in caplog.text
    assert config.input_len == 512
    caplog.clear()
    with caplog.at_level("WARNING"):
        parse_args(CPU + ["--gsm", "--input_len", "512"])
    assert "the gsm prompts keep their own lengths" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert parse_args(CPU + ["--random", "--input_len", "512"]).input_len == 512
        assert parse_args(CPU + ["--random"]).input_len == 128
    assert not caplog.text


def test_the_prefill_budget_reaches_the_engine_arguments():
    from ssd.benchmark.runner import llm_kwargs
    config = parse_args(CPU + ["--max-prefill-tokens", "4096"])
    assert llm_kwargs(config, config.arms[-1], None)["max_prefill_tokens"] == 4096
    assert parse_args(CPU).max_prefill_tokens == 16384


def test_with_ab_the_arms_decide_and_the_mode_flags_are_reported(caplog):
    with caplog.at_level("WARNING"):
        config = parse_args(CPU + ["--spec", "--async", "--colocate", "--ab", "ar,sync"])
    assert [arm.name for arm in config.arms] == ["ar", "sync"] and config.arms[1].colocated
    assert "--async: with --ab the arms (ar,sync) say what runs" in caplog.text


def test_under_srun_the_gpus_of_the_whole_job_are_accepted(monkeypatch):
    """The two-node job asks for 5 GPUs while each node shows 4: the launcher, not this node, has them."""
    monkeypatch.setattr(cli, "_visible_gpu_count", lambda: 4)
    for name, value in (("SLURM_PROCID", "0"), ("SLURM_NTASKS", "2"), ("MASTER_ADDR", "gpu-a")):
        monkeypatch.setenv(name, value)
    assert parse_args(CUDA + ["--gpus", "5", "--spec", "--async"]).gpus == 5
