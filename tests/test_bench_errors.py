"""bench.py reports what the engine refuses in one line (exit 1), before anything is timed."""
import subprocess
import sys
from pathlib import Path

import pytest

from tiny_models import make_checkpoint

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench.py"


@pytest.fixture(scope="module")
def target(tmp_path_factory) -> Path:
    return make_checkpoint("llama", tmp_path_factory.mktemp("bench") / "target")  # 4 heads, 512 positions


@pytest.mark.parametrize("extra, message", [
    (["--gpus", "3"], "cannot start the engine for arm ar (target on 3 rank(s)): tensor parallel size 3 does "
                      "not divide the model's attention heads (4)"),
    (["--max_model_len", "1000"], "max_model_len=1000 exceeds the models' context of 512 positions"),
    (["--input_len", "128", "--output_len", "400"], "prompt 0 has 128 tokens; with max_tokens=400 it needs 528 "
                                                    "positions but max_model_len is 512 (shorten --input_len"),
])
def test_a_refused_setting_is_one_line_and_exit_1(target, extra, message):
    done = subprocess.run([sys.executable, str(BENCH), "--target", str(target), "--device", "cpu", "--random",
                           "--numseqs", "2", *extra], capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert message in output and "Traceback" not in output, output
