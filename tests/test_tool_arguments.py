"""Command-line tools refuse bad input in one line before any long work starts: argparse's error
(exit 2) for bad arguments, a logged error (exit 1) for what only running finds out; no traceback."""
import importlib.util
import json
import os
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import torch

from ssd.benchmark import record_profile
from ssd.loading import offline_models
from ssd.output_files import output_file_problem
from ssd.spec import rank_vocabulary
from ssd.spec.acceptance_profile import AcceptanceProfile
from tiny_models import add_word_tokenizer, make_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[1]
CHAT_TEMPLATE = "{% for m in messages %}{{ m.content }}{% endfor %}"


@cache
def bench_script(name: str):
    """A script of bench/ imported as a module (they are not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module   # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


def refusal(main, argv: list[str], capsys) -> str:
    """The one error line argparse printed for a refused command line."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tools")
    return {"plain": add_word_tokenizer(make_checkpoint("qwen3", root / "plain")),
            "chat": add_word_tokenizer(make_checkpoint("qwen3", root / "chat"), CHAT_TEMPLATE),
            "bare": make_checkpoint("qwen3", root / "bare")}


@pytest.fixture
def a_file(tmp_path) -> Path:
    path = tmp_path / "afile"
    path.write_text("")
    return path


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


# ---------------------------------------------------------------- ssd.benchmark.record_profile

@pytest.fixture
def record_argv(checkpoints, tmp_path) -> list[str]:
    return ["--target", str(checkpoints["chat"]), "--draft", str(checkpoints["chat"]),
            "--out", str(tmp_path / "profile.json")]


@pytest.mark.parametrize("extra, message", [
    (["--numseqs", "0"], "argument --numseqs: must be >= 1"),
    (["--max-prompt-tokens", "0"], "argument --max-prompt-tokens: must be >= 1"),
    (["--b", "0"], "argument --b: must be >= 1"),
    (["--output_len", "1"], "needs traces of at least 2 tokens"),
    (["--prompts", "bogus"], "invalid choice: 'bogus'"),
    (["--target", "/nonexistent/model"], "--target /nonexistent/model: no such checkpoint directory"),
    (["--draft", "/nonexistent/model"], "--draft /nonexistent/model: no such checkpoint directory"),
])
def test_record_profile_refuses_bad_arguments(record_argv, extra, message, capsys):
    assert message in refusal(record_profile.main, record_argv + extra, capsys)


def test_record_profile_refuses_an_unwritable_out_before_recording(record_argv, a_file, tmp_path, capsys):
    assert "is not a directory" in refusal(record_profile.main, record_argv + ["--out", str(a_file / "x.json")],
                                           capsys)
    assert "is a directory" in refusal(record_profile.main, record_argv + ["--out", str(tmp_path)], capsys)
    assert output_file_problem(tmp_path / "new" / "x.json") is None   # made when written


def test_record_profile_names_its_own_flag_for_a_missing_chat_template(checkpoints, record_argv, capsys):
    plain = ["--target", str(checkpoints["plain"])]
    assert "pass --no-chat-template" in refusal(record_profile.main, record_argv + plain, capsys)
    bare = ["--target", str(checkpoints["bare"])]
    assert "has no tokenizer" in refusal(record_profile.main, record_argv + bare, capsys)


def test_record_profile_refuses_when_no_prompt_fits(record_argv, capsys):
    assert "no prompt of the code set fits" in refusal(
        record_profile.main, record_argv + ["--max-prompt-tokens", "1"], capsys)


def test_record_profile_past_the_models_context_is_one_logged_line(record_argv, caplog):
    """The tiny models know 512 positions: prompts + --output_len 600 cannot fit (found when the engine starts)."""
    assert record_profile.main(record_argv + ["--output_len", "600", "--numseqs", "1"]) == 1
    assert "exceeds the models' context" in caplog.text and "lower --output_len" in caplog.text


def test_generations_too_short_for_a_summary_are_a_recording_error():
    with pytest.raises(record_profile.RecordingError, match="stopped early"):
        record_profile.summarized(AcceptanceProfile("short", ((0, 0, 0),)))


# ---------------------------------------------------------------- ssd.spec.rank_vocabulary

@pytest.mark.parametrize("conversations", ["0", "-5"])
def test_rank_vocabulary_refuses_fewer_than_one_conversation(checkpoints, tmp_path, conversations, capsys):
    argv = ["--model", str(checkpoints["plain"]), "--out", str(tmp_path / "r.json"), "--conversations", conversations]
    assert "argument --conversations: must be >= 1" in refusal(rank_vocabulary.main, argv, capsys)


def test_rank_vocabulary_checks_model_and_out_before_counting(checkpoints, a_file, tmp_path, capsys):
    out = ["--out", str(tmp_path / "r.json")]
    assert "no such checkpoint directory" in refusal(rank_vocabulary.main, ["--model", "/nonexistent"] + out, capsys)
    assert "has no tokenizer" in refusal(rank_vocabulary.main, ["--model", str(checkpoints["bare"])] + out, capsys)
    below_a_file = ["--model", str(checkpoints["plain"]), "--out", str(a_file / "r.json")]
    assert "is not a directory" in refusal(rank_vocabulary.main, below_a_file, capsys)


# ---------------------------------------------------------------- ssd.loading.offline_models

@pytest.mark.parametrize("below", ["", "sub"])
def test_fetch_into_a_file_is_one_logged_error(a_file, below, caplog):
    cache_dir = a_file / below if below else a_file
    assert offline_models.main(["fetch", "smollm2-135m", "--cache-dir", str(cache_dir)]) == 1
    assert f"{a_file} is a file, not a directory" in caplog.text


def test_fetch_names_the_environment_variable_it_took_the_cache_from(a_file, monkeypatch):
    monkeypatch.setenv(offline_models.CACHE_DIR_ENV_VAR, str(a_file))
    with pytest.raises(offline_models.OfflineModelError, match=r"\$SSD_CACHE_DIR"):
        offline_models.fetch_offline_model("smollm2-135m")


def test_list_takes_a_cache_dir(tmp_path, capsys):
    assert offline_models.main(["list", "--cache-dir", str(tmp_path)]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert len(rows) == len(offline_models.OFFLINE_MODELS)
    assert all(f"\tnot cached\t{tmp_path.resolve()}/" in row for row in rows)


def test_bench_reports_a_bad_cache_dir_in_one_line(a_file):
    result = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "bench.py"), "--target", "smollm2-135m",
                             "--device", "cpu"], capture_output=True, text=True, timeout=120,
                            env={**os.environ, offline_models.CACHE_DIR_ENV_VAR: str(a_file)})
    assert result.returncode == 1
    assert "Traceback" not in result.stderr + result.stdout
    errors = [line for line in (result.stderr + result.stdout).splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "is a file, not a directory" in errors[0]


# ---------------------------------------------------------------- bench/draft_round_bench.py, decode_profile.py

def test_draft_round_bench_needs_cuda_unless_on_cpu(no_cuda, caplog):
    assert bench_script("draft_round_bench").main([]) == 1
    assert "needs a CUDA device" in caplog.text


@pytest.mark.parametrize("extra, message", [
    (["--kernels"], "--kernels profiles CUDA kernels: it needs --device cuda"),
    (["--iters", "0"], "argument --iters: must be >= 1"),
    (["--batches", "1", "0"], "argument --batches: must be >= 1"),
    (["--preset", "nosuch"], "'nosuch' is neither a preset (llama-3.1-70b"),
])
def test_draft_round_bench_refuses_bad_arguments(extra, message, capsys):
    assert message in refusal(bench_script("draft_round_bench").main, ["--device", "cpu"] + extra, capsys)


@pytest.mark.parametrize("extra, message", [
    (["--model", "nosuch"], "'nosuch' is neither a preset (llama-3.1-70b"),
    (["--tp", "1", "0"], "argument --tp: must be >= 1"),
    (["--tokens", "1"], "argument --tokens: must be >= 2"),
])
def test_tp_profile_refuses_bad_arguments(extra, message, capsys):
    assert message in refusal(bench_script("tp_profile").main, ["--device", "cpu"] + extra, capsys)


def test_tp_profile_says_how_many_gpus_it_needs(no_cuda, caplog):
    assert bench_script("tp_profile").main(["--tp", "1", "4"]) == 1
    assert "--tp 4 needs 4 GPUs; 0 visible" in caplog.text


def test_draft_round_bench_takes_a_checkpoint_directory_as_preset(checkpoints):
    args = bench_script("draft_round_bench").build_parser().parse_args(["--preset", str(checkpoints["bare"])])
    assert args.preset == str(checkpoints["bare"])


def test_draft_round_bench_restricts_a_checkpoints_head(checkpoints, tmp_path):
    """--vocab N with a checkpoint directory (its vocabulary was looked up among the presets)."""
    out = tmp_path / "round.json"
    assert bench_script("draft_round_bench").main(
        ["--device", "cpu", "--preset", str(checkpoints["bare"]), "--vocab", "50", "--batches", "1",
         "--iters", "1", "--warmup", "0", "--context", "16", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [row["head_vocab"] for row in rows] == ["50"]
    kept_vs_full = rows[0]["filtered_kept_vs_full_rows"]
    assert kept_vs_full["token_agreement"] == 1.0 and kept_vs_full["max_abs_prob_diff"] < 1e-6


def test_draft_round_bench_measures_fp8_rows_arms_only_for_fp8_weights(checkpoints, tmp_path):
    out = tmp_path / "round.json"
    assert bench_script("draft_round_bench").main(
        ["--device", "cpu", "--preset", str(checkpoints["bare"]), "--quant", "none", "fp8:down_proj", "--fp8-rows",
         "produced", "separate", "--batches", "1", "--iters", "1", "--warmup", "0", "--context", "16",
         "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(row["weights"], row.get("fp8_rows")) for row in rows] == [
        ("none", None), ("fp8:down_proj", "produced"), ("fp8:down_proj", "separate")]


def test_decode_profile_needs_cuda(no_cuda, caplog, capsys):
    decode_profile = bench_script("decode_profile")
    assert decode_profile.main([]) == 1
    assert "needs a CUDA device" in caplog.text
    assert "argument --steps: must be >= 1" in refusal(decode_profile.main, ["--steps", "0"], capsys)


@pytest.mark.parametrize("script", ["attention_kernel_bench", "decode_profile", "draft_kernel_sweep",
                                    "draft_round_bench", "engine_bench", "prefill_bench"])
def test_gpu_benches_refuse_a_result_file_they_could_not_write(script, tmp_path, a_file, capsys):
    main = bench_script(script).main
    assert "is a directory" in refusal(main, ["--out", str(tmp_path)], capsys)
    assert "is not a directory" in refusal(main, ["--out", str(a_file / "result.json")], capsys)


def test_help_shows_example_commands_with_their_line_continuation():
    help_text = bench_script("draft_round_bench").build_parser().format_help()
    assert "--f 3 \\\n        --batches 1 16" in help_text
    assert "--prompt-len 2048 \\\n        --max-prefill-tokens" in bench_script("prefill_bench").__doc__


# ---------------------------------------------------------------- bench/coordinator_bench.py

@pytest.mark.parametrize("extra, message", [
    (["--async"], "--async: speculative decoding needs a draft"),
    (["--k", "3"], "--k: speculative decoding needs a draft"),
    (["--mode", "sync"], "--mode sync: speculative decoding needs a draft"),
    (["--draft", "self"], "--draft needs --k >= 1"),
    (["--num-prompts", "0"], "argument --num-prompts: must be >= 1"),
    (["--repeats", "0"], "argument --repeats: must be >= 1"),
    (["--json", "/"], "argument --json: /: is a directory"),
])
def test_coordinator_bench_refuses_bad_arguments(extra, message, capsys):
    assert message in refusal(bench_script("coordinator_bench").parse_args, ["--tiny"] + extra, capsys)


def test_coordinator_bench_accepts_a_speculative_run():
    args = bench_script("coordinator_bench").parse_args(["--tiny", "--draft", "self", "--k", "2", "--async"])
    assert args.async_spec and args.k == 2


# ---------------------------------------------------------------- bench/activation_range.py

def test_activation_range_reads_each_decoder_layers_input(checkpoints, tmp_path):
    """Its maxima are those of the inputs each decoder layer receives (hooks, read independently)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    script, path = bench_script("activation_range"), checkpoints["plain"]
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    prompts = [tokenizer.encode("w5 w9 w3 w12 w7"), tokenizer.encode("w4 w4 w30")]
    seen = {}

    def keep(index):
        def hook(module, args, kwargs):
            h = (args[0] if args else kwargs["hidden_states"])[0].abs()
            before = seen.get(index, (0.0, 0.0))
            seen[index] = (max(before[0], h.max().item()), max(before[1], h[1:].max().item()))
        return hook
    handles = [layer.register_forward_pre_hook(keep(i), with_kwargs=True) for i, layer in enumerate(model.model.layers)]
    layers = script.layer_input_maxima(model, prompts)
    for handle in handles:
        handle.remove()
    assert len(layers) == len(model.model.layers) == len(seen)
    for layer in layers:
        assert (layer["max_abs"], layer["max_abs_after_first"]) == pytest.approx(seen[layer["layer"]])
        assert layer["max_abs"] >= layer["max_abs_after_first"] > 0
    out = tmp_path / "range.json"
    script.main(["--models", str(path), "--numseqs", "2", "--out", str(out)])
    result = json.loads(out.read_text())["models"][0]
    assert result["count"] == 2 and len(result["layers"]) == len(model.model.layers)


def test_activation_range_refuses_an_unknown_model(capsys):
    assert "bogus: no such checkpoint directory, nor unknown offline model 'bogus'" in refusal(
        bench_script("activation_range").main, ["--models", "bogus", "--out", "x.json"], capsys)
