"""Random weights (presets, random_weights=True) are one model at every tensor-parallel size."""
import torch

from ssd import LLM, SamplingParams
from ssd.loading.random_weights import RandomTensor

PROMPTS = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14], list(range(20, 45))]


def greedy_tokens(path, tp_size: int, random_weights: bool = True) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    with LLM(str(path), max_model_len=128, tensor_parallel_size=tp_size, random_weights=random_weights) as llm:
        return [o.token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]


def test_random_weights_give_the_same_output_at_tp_1_and_2(tiny_checkpoints):
    # llama: untied head and a vocabulary (97) that does not split evenly over two ranks
    path = tiny_checkpoints["llama"]
    one = greedy_tokens(path, 1)
    assert greedy_tokens(path, 2) == one
    assert greedy_tokens(path, 1, random_weights=False) != one   # the checkpoint's weights were not used


def test_random_tensor_is_drawn_from_its_name_and_seed():
    def draw(name: str, seed: int = 0) -> torch.Tensor:
        return RandomTensor(name, torch.Size([64, 32]), seed, torch.float32, torch.device("cpu")).full()

    a = draw("model.layers.0.mlp.up_proj.weight")
    assert torch.equal(a, draw("model.layers.0.mlp.up_proj.weight"))
    assert not torch.equal(a, draw("model.layers.0.mlp.gate_proj.weight"))
    assert not torch.equal(a, draw("model.layers.0.mlp.up_proj.weight", seed=1))
    assert abs(a.std().item() - 32 ** -0.5) < 0.02   # std 1/sqrt(fan_in)
    assert torch.equal(draw("model.norm.weight"), torch.ones(64, 32))
    tensor = RandomTensor("x.weight", torch.Size([8, 6]), 0, torch.float32, torch.device("cpu"))
    assert torch.equal(tensor.narrow(1, 2, 3), tensor.full()[:, 2:5])
