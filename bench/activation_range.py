"""How large does a real model's residual stream get? The fused norm + product kernels of an fp8 draft
(ssd.layers.norm_fusion, f16 operands) take the un-normalized hidden state h into the MMA as float16,
whose largest finite value is 65504: a layer input beyond it would be clamped there (the norm's own sum
of squares, in float32, is exact). This reads every decoder layer's input on real prompts with Hugging
Face transformers (float32) and reports the largest |h| per layer, over all positions and without the
first one (the "massive activations" of the first token). The fused kernels run in every forward of at
most 64 rows — decode, windows, the draft's tree, and the prefill of a short prompt, first position and
all — so the float16 headroom is taken over all positions.

    python bench/activation_range.py --out activation_range.json                 # the offline pair
    python bench/activation_range.py --models /path/to/checkpoint --prompts code --numseqs 8 --out F
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from ssd.benchmark.cli import DEFAULT_OFFLINE_PAIR  # noqa: E402
from ssd.benchmark.record_profile import prompt_set  # noqa: E402
from ssd.benchmark.results import collect_env  # noqa: E402
from ssd.cli_types import at_least, writable_file  # noqa: E402
from ssd.json_files import write_json  # noqa: E402
from ssd.loading.offline_models import OfflineModelError, fetch_offline_model, get_offline_model_spec  # noqa: E402

log = logging.getLogger("activation_range")
FLOAT16_MAX = torch.finfo(torch.float16).max


def model_name(text: str) -> str:
    """argparse type: a checkpoint directory or the name of an offline model."""
    if not Path(text).is_dir():
        try:
            get_offline_model_spec(text)
        except OfflineModelError as exc:
            raise argparse.ArgumentTypeError(f"{text}: no such checkpoint directory, nor {exc}") from None
    return text


def checkpoint_dir(name: str) -> Path:
    """A checkpoint directory, or the name of an offline model (fetched once)."""
    return Path(name) if Path(name).is_dir() else fetch_offline_model(name)


@torch.inference_mode()
def layer_input_maxima(model, prompt_ids: list[list[int]]) -> list[dict]:
    """Per decoder layer: the largest |h| at any position and at positions >= 1, over all prompts."""
    maxima = None
    for ids in prompt_ids:
        hidden = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[:-1]   # layer inputs
        seen = [(h[0].abs().max().item(), h[0, 1:].abs().max().item() if len(ids) > 1 else 0.0) for h in hidden]
        maxima = seen if maxima is None else [(max(a, c), max(b, d)) for (a, b), (c, d) in zip(maxima, seen)]
    return [{"layer": i, "max_abs": a, "max_abs_after_first": b} for i, (a, b) in enumerate(maxima)]


def measure(name: str, prompts: str, numseqs: int, max_prompt_tokens: int) -> dict:
    import transformers
    path = checkpoint_dir(name)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    texts = prompt_set(prompts, numseqs, tokenizer, max_prompt_tokens)
    layers = layer_input_maxima(model, [tokenizer.encode(t) for t in texts])
    largest = max(layer["max_abs"] for layer in layers)
    log.info("%s: %d prompts; largest |h| %.1f (%.1f after the first position): float16 headroom %.0fx",
             name, len(texts), largest, max(layer["max_abs_after_first"] for layer in layers), FLOAT16_MAX / largest)
    return {"model": name, "prompts": prompts, "count": len(texts), "layers": layers,
            "float16_headroom": FLOAT16_MAX / largest}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", type=model_name, default=list(DEFAULT_OFFLINE_PAIR),
                        help="checkpoint directories or offline model names (default: the offline pair)")
    parser.add_argument("--prompts", default="code", choices=("code", "chat", "default"))
    parser.add_argument("--numseqs", type=at_least(1), default=8)
    parser.add_argument("--max-prompt-tokens", type=at_least(1), default=1024)
    parser.add_argument("--out", required=True, type=writable_file)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    results = [measure(m, args.prompts, args.numseqs, args.max_prompt_tokens) for m in args.models]
    write_json(args.out, {"schema": "ssd-activation-range/1", "float16_max": FLOAT16_MAX, "env": collect_env(),
                          "models": results})


if __name__ == "__main__":
    main()
