import os
import sys
from pathlib import Path

# Triton kernels (ssd.layers.triton_attention) run on CPU tensors under Triton's interpreter; it is
# chosen when a kernel is defined, so before anything imports one
os.environ.setdefault("TRITON_INTERPRET", "1")
# measured kernel choices are not kept between tests (nor read from a developer's cache): the tests
# of ssd.layers.choice_cache name their own file
os.environ["SSD_KERNEL_CACHE"] = "off"

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import make_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """One tiny random checkpoint per supported family (llama has llama3 rope scaling)."""
    root = tmp_path_factory.mktemp("tiny")
    return {family: make_checkpoint(family, root / family) for family in ("llama", "qwen2", "qwen3")}
