"""A dying worker makes generate() fail loudly and quickly; nothing hangs."""
import threading
import time

import pytest

from ssd import LLM, SamplingParams
from ssd.engine.llm import WorkerDiedError

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
