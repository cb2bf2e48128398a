"""Ctrl-C (and SIGTERM to bench.py): rank 0 decides what stops (workers ignore SIGINT), nothing is left
running, no traceback."""
import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ssd import LLM, SamplingParams
from ssd.draft_worker.remote import RemoteDraft
from ssd.engine.autoregressive import AutoregressiveDecoder
from process_table import live_members
from tiny_models import add_word_tokenizer, make_checkpoint, perturbed_copy

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench.py"


def interrupt_on_call(monkeypatch, owner, name: str, call: int) -> None:
    """Ctrl-C arriving during the call-th call of owner.name on rank 0 (raised where Python's
    SIGINT handler would raise it); test_ctrl_c_ends_a_benchmark_cleanly sends the real signal."""
    calls = itertools.count()
    original = getattr(owner, name)

    def interrupted(self, *args, **kwargs):
        if next(calls) == call:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(owner, name, interrupted)


def test_interrupt_mid_round_ends_the_workers(tiny_checkpoints, monkeypatch):
    """Interrupted after sending the draft its outcome but before taking its reply (which the draft
    then cannot deliver), rank 0 cannot tell the workers to stop cleanly: it ends them."""
    path = str(tiny_checkpoints["qwen2"])
    interrupt_on_call(monkeypatch, RemoteDraft, "_recv_reply", call=3)
    llm = LLM(path, max_model_len=512, draft=path, num_speculative_tokens=3, async_spec=True,
              tensor_parallel_size=2, timeout_s=30)
    try:
        workers = list(llm.group.processes)
        with pytest.raises(KeyboardInterrupt):
            llm.generate([[5, 6, 7]] * 4, SamplingParams(temperature=0, max_tokens=100, ignore_eos=True),
                         use_tqdm=False)
        assert not any(w.is_alive() for w in workers)
        with pytest.raises(RuntimeError, match="shut down"):
            llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4), use_tqdm=False)
    finally:
        llm.shutdown()


def test_interrupt_leaves_an_engine_without_workers_usable(tiny_checkpoints, monkeypatch):
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    with LLM(str(tiny_checkpoints["llama"]), max_model_len=512) as llm:
        expected = llm.generate([[5, 6, 7]] * 2, params, use_tqdm=False)
        interrupt_on_call(monkeypatch, AutoregressiveDecoder, "decode_step", call=5)
        with pytest.raises(KeyboardInterrupt):
            llm.generate([[9, 8]] * 3, params, use_tqdm=False)
        again = llm.generate([[5, 6, 7]] * 2, params, use_tqdm=False)
        assert [o.token_ids for o in again] == [o.token_ids for o in expected]


@pytest.mark.parametrize("signum, whole_group, code, message", [
    (signal.SIGINT, True, 130, "interrupted; no results written"),     # a terminal's Ctrl-C: the foreground group
    (signal.SIGTERM, False, 143, "terminated (SIGTERM); no results written"),  # `kill PID` of rank 0 alone
])
def test_a_signal_ends_a_benchmark_cleanly(tmp_path, signum, whole_group, code, message):
    target = add_word_tokenizer(make_checkpoint("llama", tmp_path / "target"))
    draft = add_word_tokenizer(perturbed_copy(target, tmp_path / "draft", noise=0.05))
    result = tmp_path / "result.json"
    bench = subprocess.Popen(
        [sys.executable, str(BENCH), "--target", str(target), "--draft-path", str(draft), "--spec", "--async",
         "--k", "3", "--f", "2", "--gpus", "2", "--device", "cpu", "--b", "2", "--numseqs", "64",
         "--output_len", "300", "--random", "--json", str(result)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    log = []
    for line in bench.stdout:  # until the workers are up and the timed batches run
        log.append(line)
        if "draft worker ready" in line:
            break
    time.sleep(2.0)
    (os.killpg if whole_group else os.kill)(bench.pid, signum)
    rest, _ = bench.communicate(timeout=60)
    output = "".join(log) + rest
    assert bench.returncode == code, output
    assert message in output and "Traceback" not in output, output
    assert not result.exists()
    deadline = time.monotonic() + 10  # multiprocessing's resource tracker leaves just after its parent
    while live_members(process_group=bench.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert live_members(process_group=bench.pid) == []  # no worker outlived the run
