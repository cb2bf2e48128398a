"""A dying worker makes generate() fail loudly and quickly; nothing hangs."""
import itertools
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch.distributed

from ssd import LLM, SamplingParams
from ssd.distributed.launch import Role, spawn_group
from ssd.distributed.worker_watch import WorkerWatch, describe
from ssd.engine.autoregressive import AutoregressiveDecoder
from ssd.engine.llm import WorkerDiedError
from process_table import process_gone

LONG = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)


def kill_soon(process, delay_s: float) -> threading.Thread:
    thread = threading.Thread(target=lambda: (time.sleep(delay_s), process.kill()), daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("victim", ["draft", "tp1"])
def test_killing_a_worker_fails_generate_with_a_clear_error(tiny_checkpoints, victim):
    path = str(tiny_checkpoints["qwen2"])
    llm = LLM(path, max_model_len=512, draft=path, num_speculative_tokens=3, async_spec=True,
              tensor_parallel_size=2, timeout_s=30)
    try:
        process = next(p for p in llm.group.processes if p.name.endswith(victim))
        kill_soon(process, 1.0)
        start = time.perf_counter()
        with pytest.raises(WorkerDiedError, match=victim):
            for _ in range(100):  # long enough that the kill lands mid-run
                llm.generate([[5, 6, 7]] * 4, LONG, use_tqdm=False)
        assert time.perf_counter() - start < 60
    finally:
        llm.shutdown()


def test_generate_after_a_worker_died_between_calls_fails_at_once(tiny_checkpoints):
    path = str(tiny_checkpoints["qwen2"])
    llm = LLM(path, max_model_len=512, tensor_parallel_size=2, timeout_s=30)
    try:
        llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
        worker = llm.group.processes[0]
        worker.kill()
        worker.join(10)
        deadline = time.monotonic() + 10
        while not llm.worker_watch.dead and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(WorkerDiedError, match="tp1"):
            llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
        with pytest.raises(WorkerDiedError):  # and stays refused
            llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    finally:
        llm.shutdown()


def test_a_draft_that_cannot_load_its_weights_fails_the_start_quickly(tiny_checkpoints, tmp_path):
    """Rank 0 loads only the target: without waiting for the workers' ready keys the engine would
    start and the first generate would fail (over NCCL: hang until the group's timeout)."""
    target = tiny_checkpoints["qwen2"]
    broken = Path(shutil.copytree(target, tmp_path / "broken"))
    with open(broken / "model.safetensors", "r+b") as weights:
        weights.truncate(5000)
    start = time.monotonic()
    with pytest.raises(WorkerDiedError, match=r"during model loading: ssd-draft \(pid \d+, exit code 1\)"):
        LLM(str(target), max_model_len=512, draft=str(broken), num_speculative_tokens=3, async_spec=True,
            tensor_parallel_size=2, timeout_s=120)
    assert time.monotonic() - start < 60  # not the 120 s timeout


class ExplodesWhenUnpickled:
    """A role argument that kills the worker before it reaches the rendezvous."""

    def __reduce__(self):
        return (os._exit, (3,))


def test_a_worker_that_dies_before_the_rendezvous_fails_the_spawn_quickly():
    start = time.monotonic()
    with pytest.raises(WorkerDiedError, match=r"ssd-doomed \(pid \d+, exit code 3\)"):
        spawn_group(1, "cpu", 120, [Role("doomed", print, (ExplodesWhenUnpickled(),))])
    assert time.monotonic() - start < 30
    assert not torch.distributed.is_initialized()


def sleep_long() -> None:
    time.sleep(120)


def test_the_watch_reports_a_dead_worker_but_not_after_stop():
    context = mp.get_context("spawn")
    workers = [context.Process(target=sleep_long, daemon=True, name=f"sleeper{i}") for i in range(2)]
    for w in workers:
        w.start()
    reported = threading.Event()
    watch = WorkerWatch(workers, lambda dead: reported.set())
    workers[1].kill()
    assert reported.wait(10)
    assert watch.dead == [workers[1]] and "sleeper1" in describe(watch.dead)
    quiet = WorkerWatch(workers[:1], lambda dead: reported.clear())
    quiet.stop()
    workers[0].kill()
    workers[0].join(10)
    time.sleep(0.5)
    assert reported.is_set()  # stopped watches do not call back


def test_a_worker_whose_parent_is_killed_exits_by_itself(tmp_path):
    """SIGKILL of rank 0 (OOM killer, scancel): its workers must not wait on for rank 0 forever."""
    script = tmp_path / "parent.py"
    script.write_text(ORPHAN_PARENT)
    parent = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                            cwd=tmp_path)
    assert parent.returncode == 0, parent.stderr
    child = int(parent.stdout.split()[-1])
    deadline = time.monotonic() + 20
    while not process_gone(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert process_gone(child), "the orphaned worker is still running"


def test_a_worker_whose_rank_0_dies_says_so_in_one_line(tiny_checkpoints, tmp_path):
    """The draft worker waits for rank 0's next command when rank 0 is killed: its broken connection
    ends it with one line, not a gloo traceback on the user's terminal."""
    script = tmp_path / "rank0.py"
    script.write_text(KILLED_RANK_0.format(model=str(tiny_checkpoints["llama"])))
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    output = run.stdout + run.stderr   # read to the end: the worker shares the pipes and exits last
    assert run.returncode == -signal.SIGKILL and "generated" in output, output
    assert "is gone; exiting" in output and "Traceback" not in output, output


KILLED_RANK_0 = """
import logging, os, signal
from ssd import LLM, SamplingParams

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    llm = LLM({model!r}, max_model_len=64, draft={model!r}, num_speculative_tokens=2, async_spec=True)
    llm.generate([[5, 6]], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    print("generated", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


ORPHAN_PARENT = """
import multiprocessing as mp, os, time
from ssd.distributed.orphan_watch import exit_when_orphaned

def worker(parent_pid):
    exit_when_orphaned(parent_pid, interval_s=0.1)
    time.sleep(120)

if __name__ == "__main__":
    child = mp.get_context("spawn").Process(target=worker, args=(os.getpid(),))
    child.start()
    time.sleep(3)  # the child is up and watching
    print(child.pid, flush=True)
    os._exit(0)  # no clean-up, like a SIGKILL
"""


def test_a_failure_on_rank_0_mid_run_ends_the_workers(tiny_checkpoints, monkeypatch):
    """After an error part-way through a run the workers' place in the protocol is unknown: the engine
    ends them and refuses further use rather than send them commands they might misread."""
    calls = itertools.count()
    original = AutoregressiveDecoder.decode_step

    def failing_step(self, running):
        if next(calls) == 3:
            raise RuntimeError("injected failure")
        return original(self, running)

    monkeypatch.setattr(AutoregressiveDecoder, "decode_step", failing_step)
    with LLM(str(tiny_checkpoints["qwen2"]), max_model_len=512, tensor_parallel_size=2, timeout_s=30) as llm:
        workers = list(llm.group.processes)
        with pytest.raises(RuntimeError, match="injected failure"):
            llm.generate([[5, 6, 7]] * 2, SamplingParams(temperature=0, max_tokens=20), use_tqdm=False)
        assert not any(w.is_alive() for w in workers)
        with pytest.raises(RuntimeError, match="shut down"):
            llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)


def test_an_engine_idle_past_the_group_timeout_keeps_its_workers(tiny_checkpoints):
    """Workers wait for rank 0's next command without a timeout (an engine may idle between requests
    for hours); only collectives inside a command keep the process group's timeout."""
    path = str(tiny_checkpoints["qwen2"])
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    with LLM(path, max_model_len=512, draft=path, num_speculative_tokens=3, async_spec=True,
             tensor_parallel_size=2, timeout_s=12) as llm:  # start-up takes ~4 s of it
        first = llm.generate([[5, 6, 7]] * 2, params, use_tqdm=False)
        time.sleep(14)  # past the timeout: the TP rank and the draft wait for commands all along
        again = llm.generate([[5, 6, 7]] * 2, params, use_tqdm=False)
        assert [o.token_ids for o in again] == [o.token_ids for o in first]
        assert all(p.is_alive() for p in llm.group.processes)
