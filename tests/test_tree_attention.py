"""The draft's batched speculation tree equals decoding every branch on its own."""
import dataclasses

import pytest
import torch

from ssd.distributed.tp_group import TPGroup
from ssd.draft_worker.outcome_lookup import find_branch
from ssd.draft_worker.tree import TreeBuilder, TreeShape
from ssd.engine.model_runner import ModelRunner
from ssd.engine.runner_config import RunnerConfig


def runner_for(path, scratch_len=0, head_vocabulary=None) -> ModelRunner:
    return ModelRunner(RunnerConfig(model=str(path), max_len=128, num_slots=4, window_sizes=(2, 4),
                                    scratch_len=scratch_len, head_vocabulary=head_vocabulary), TPGroup())


# a draft head over 50 of the 97 tokens, not a prefix of the ids (ssd.spec.draft_vocabulary)
RESTRICTED = tuple(sorted(list(range(1, 97, 2)) + [0, 2]))


def greedy_continuation(runner: ModelRunner, context: list[int], k: int) -> tuple[list[int], torch.Tensor]:
    """Plain single-sequence decoding in slot 0: the reference for one branch."""
    ids = torch.tensor([context])
    logits = runner.forward(ids, torch.arange(len(context))[None], len(context))[:, -1]
    first_logits, out = logits[0], []
    for step in range(k):
        out.append(int(logits.argmax(-1)))
        logits = runner.forward(torch.tensor([[out[-1]]]), torch.tensor([[len(context) + step]]),
                                len(context) + k)[:, -1]
    return out, first_logits


def use_fused_attention(runner: ModelRunner, tree_kv_in_attention: bool = False) -> None:
    """Swap the model's attention to the Triton kernel (on CPU: under Triton's interpreter);
    tree_kv_in_attention: the kernel also writes tree steps' k/v (no rope_and_cache there)."""
    from ssd.layers.triton_attention import fused_attention
    for module in runner.model.modules():
        if hasattr(module, "kernels"):
            module.kernels = dataclasses.replace(module.kernels, fused_attention=fused_attention,
                                                 tree_kv_in_attention=tree_kv_in_attention)


@pytest.mark.parametrize("fused,head,family", [(False, None, "llama"), (True, None, "llama"), ("kv", None, "llama"),
                                               (False, RESTRICTED, "llama"), (True, None, "qwen3"),
                                               ("kv", None, "qwen3")],
                         ids=["matmul", "fused", "fused-writes-kv", "restricted-head", "fused-qwen3",
                              "fused-writes-kv-qwen3"])
def test_tree_branches_match_independent_decoding(tiny_checkpoints, fused, head, family):
    """Also wires the fused kernel end to end: each tree query's prefix limit and scratch mask (and,
    "kv", the kernel writing the tree steps' k/v itself; qwen3: its q/k norms in the kernel, the RoPE +
    KV write or one kernel of their own); and a restricted head's greedy tree steps (argmax over its
    kept logits) against full -inf-filled rows."""
    if fused:
        pytest.importorskip("triton")
    k, shape = 3, TreeShape(3, (2, 1, 0, 2), (1, 2, 1, 0))
    tree_runner = runner_for(tiny_checkpoints[family], shape.scratch_len, head)
    if fused:
        use_fused_attention(tree_runner, tree_kv_in_attention=fused == "kv")
    reference = runner_for(tiny_checkpoints[family], head_vocabulary=head)
    prompts = [[5, 6, 7, 8, 9], [11, 12, 13, 14, 15, 16, 17, 18]]
    width = max(map(len, prompts))
    ids = torch.tensor([p + [0] * (width - len(p)) for p in prompts])
    tree_runner.forward(ids, torch.arange(width).expand(2, width).contiguous(), width,
                        logits_index=torch.tensor([len(p) - 1 for p in prompts]))
    # window = [last committed token, d1..dK]; the committed prefix excludes the window's first token
    window = torch.tensor([[9, 40, 41, 42], [18, 50, 51, 52]])
    lengths = torch.tensor([len(p) for p in prompts])
    builder = TreeBuilder(tree_runner, shape)
    cache = builder.build(window, lengths, torch.tensor([True, False]), None, int(lengths.max()))
    for row, prompt in enumerate(prompts):
        for n in range(shape.num_branches):
            if not cache.valid[row, n]:
                continue
            fork = int(cache.fork[n])
            context = prompt[:-1] + window[row, : fork + 1].tolist() + [int(cache.guess[row, n])]
            expected, _ = greedy_continuation(reference, context, k)
            assert cache.tokens[row, n].tolist() == expected, (row, n)
            assert head is None or set(expected) <= set(head)


def test_fork_guesses_exclude_the_drafted_token(tiny_checkpoints):
    shape = TreeShape(2, (3, 3, 3), (3, 3, 3))
    runner = runner_for(tiny_checkpoints["qwen3"], shape.scratch_len)
    prompt = torch.tensor([[3, 4, 5, 6]])
    runner.forward(prompt, torch.arange(4)[None], 4)
    logits = runner.forward(torch.tensor([[6, 7, 8]]), torch.tensor([[3, 4, 5]]), 6)
    drafted = logits[0, :2].argmax(-1)  # the draft's own top choices: must never be guessed
    cache = TreeBuilder(runner, shape).build(torch.cat([torch.tensor([6]), drafted])[None], torch.tensor([4]),
                                             torch.tensor([True]), None, 4)
    for n in range(shape.num_branches):
        fork = int(cache.fork[n])
        if fork < 2:
            assert int(cache.guess[0, n]) != int(drafted[fork])


def test_fork_guesses_equal_per_position_top_f_without_the_drafted_token():
    from ssd.draft_worker.tree import fork_guesses
    g = torch.Generator().manual_seed(4)
    fanout = (2, 0, 3, 1, 4)  # K = 4
    shape = TreeShape(4, fanout, fanout)
    logits = torch.randn(3, 5, 50, generator=g)
    drafted = logits[:, :4].argmax(-1)
    drafted[1] = logits[1, :4].topk(3).indices[:, 2]   # row 1 drafted a lower-ranked token
    guesses = fork_guesses(logits, drafted, shape.branch_fork("cpu"), shape.branch_rank("cpu"), max(fanout) + 1)
    # the captured fork (ForkGraphs) takes the widest top-k any re-fit of the budget may need: same guesses
    widest = fork_guesses(logits, drafted, shape.branch_fork("cpu"), shape.branch_rank("cpu"), shape.num_branches + 1)
    assert torch.equal(widest, guesses)
    for row in range(3):
        expected = []
        for j, f in enumerate(fanout):
            ranked = [t for t in logits[row, j].argsort(descending=True).tolist()
                      if j == 4 or t != int(drafted[row, j])]
            expected += ranked[:f]
        assert guesses[row].tolist() == expected


def test_fork_guesses_over_kept_logits_equal_those_over_the_spread_rows():
    """The async draft's window with a restricted head returns its kept tokens' logits only
    (RunnerConfig.kept_logits): the same guesses as over the -inf-filled full rows."""
    from ssd.draft_worker.tree import fork_guesses
    from ssd.layers.embed_head import spread_logits
    g = torch.Generator().manual_seed(5)
    fanout = (3, 1, 0, 2)  # K = 3
    shape = TreeShape(3, fanout, fanout)
    kept_ids = torch.randperm(80, generator=g)[:30].sort().values
    kept = torch.randn(4, 4, 30, generator=g)
    drafted = kept_ids[kept[:, :3].argmax(-1)]
    drafted[2] = kept_ids[kept[2, :3].topk(2).indices[:, 1]]
    args = (shape.branch_fork("cpu"), shape.branch_rank("cpu"), shape.num_branches + 1)
    assert torch.equal(fork_guesses(kept, drafted, *args, kept_ids=kept_ids),
                       fork_guesses(spread_logits(kept, kept_ids, 80), drafted, *args))


@pytest.mark.parametrize("saguaro_c", [1.0, 0.3])
def test_filtered_branches_are_drawn_from_the_distribution_the_cache_keeps(tiny_checkpoints, saguaro_c):
    """Many rows with one context and their own seeds: each branch's first token, counted over the
    rows, follows the distribution its cache lookup returns (kept compact, widened at lookup; with
    Saguaro's C < 1 rescaled on the top F) — what the verifier is given as q on a hit."""
    from scipy.stats import chisquare
    from ssd import SamplingParams
    from ssd.draft_worker.compact_probs import CompactProbs
    from ssd.engine.sampler import SamplingTensors
    rows, shape = 3000, TreeShape(1, (2, 1), (2, 1))
    runner = ModelRunner(RunnerConfig(model=str(tiny_checkpoints["llama"]), max_len=16, num_slots=rows,
                                      window_sizes=(2,), scratch_len=shape.scratch_len), TPGroup())
    prompt = torch.tensor([[5, 6, 7, 8]]).expand(rows, 4)
    runner.forward(prompt, torch.arange(4).expand(rows, 4).contiguous(), 4)
    sampling = SamplingTensors.from_params(
        [SamplingParams(temperature=1.0, top_k=10, top_p=0.9, seed=i) for i in range(rows)], "cpu", 0)
    window = torch.tensor([[8, 40]]).expand(rows, 2)
    cache = TreeBuilder(runner, shape, saguaro_c).build(window, torch.full((rows,), 4),
                                                        torch.ones(rows, dtype=torch.bool), sampling, 4)
    assert isinstance(cache.probs, CompactProbs)
    for branch in range(shape.num_branches):
        fork = int(cache.fork[branch])
        _, found, tokens = find_branch(cache.valid, cache.fork, cache.guess, cache.tokens, torch.full((rows,), fork),
                                       cache.guess[:, branch])
        q = cache.branch_probs(found)
        torch.testing.assert_close(q, q[:1].expand_as(q))          # one context: one distribution
        q = q[0, 0].double()
        assert (q > 0).sum() <= 10 and q[tokens[:, 0]].min() > 0
        observed = torch.bincount(tokens[:, 0], minlength=q.numel()).double()
        kept = q > 0
        assert chisquare(observed[kept].numpy(), (q[kept] / q[kept].sum() * rows).numpy()).pvalue > 1e-3


def caches_of_kept_columns_and_full_rows(checkpoint, params, saguaro_c=1.0, temperature_sample=None):
    """Two trees of a restricted head built from one context: sampling its kept tokens' logits, and
    its -inf-filled full rows (head_ids None)."""
    from ssd.engine.sampler import SamplingTensors
    shape = TreeShape(2, (2, 1, 1), (2, 1, 1))
    runner = runner_for(checkpoint, shape.scratch_len, head_vocabulary=RESTRICTED)
    runner.forward(torch.tensor([[5, 6, 7, 8], [9, 9, 3, 1]]), torch.arange(4).expand(2, 4).contiguous(), 4)
    sampling = SamplingTensors.from_params(params, "cpu", 0)
    caches = []
    for kept in (True, False):
        builder = TreeBuilder(runner, shape, saguaro_c)
        builder.temperature_sample = temperature_sample
        if not kept:
            builder.head_ids = None
        assert builder.samples_kept_columns() == kept
        caches.append(builder.build(torch.tensor([[8, 1, 3], [1, 5, 7]]), torch.tensor([4, 4]),
                                    torch.ones(2, dtype=torch.bool), sampling, 4))
    return caches


def test_temperature_steps_of_a_restricted_head_sample_its_kept_columns(tiny_checkpoints):
    """On the GPU a temperature-only tree step runs the Triton kernel (here its interpreter); with a
    restricted head it reads the kept tokens' logits only, and must give the branches' tokens and the
    cached q of the -inf-filled full rows."""
    pytest.importorskip("triton")
    from ssd import SamplingParams
    from ssd.engine.triton_temperature_sampling import temperature_sample
    kept_cache, full_cache = caches_of_kept_columns_and_full_rows(
        tiny_checkpoints["llama"], [SamplingParams(temperature=0.8, seed=3), SamplingParams(temperature=1.3, seed=4)],
        temperature_sample=temperature_sample)
    assert torch.equal(kept_cache.tokens, full_cache.tokens)
    torch.testing.assert_close(kept_cache.probs, full_cache.probs, rtol=1e-5, atol=1e-7)
    outside = torch.ones(97, dtype=torch.bool)
    outside[list(RESTRICTED)] = False
    assert kept_cache.probs[..., outside].abs().max() == 0


@pytest.mark.parametrize("saguaro_c", [1.0, 0.3])
def test_pytorch_sampled_steps_of_a_restricted_head_sample_its_kept_columns(tiny_checkpoints, saguaro_c):
    """Without the Triton kernel (C < 1, or no Triton) a sampled tree step's distribution is computed
    over a restricted head's kept logits and written at their columns: the branches' tokens and the
    cached q of the -inf-filled full rows."""
    from ssd import SamplingParams
    kept_cache, full_cache = caches_of_kept_columns_and_full_rows(
        tiny_checkpoints["llama"], [SamplingParams(temperature=0.8, seed=3), SamplingParams(temperature=1.3, seed=4)],
        saguaro_c)
    assert torch.equal(kept_cache.tokens, full_cache.tokens)
    torch.testing.assert_close(kept_cache.probs, full_cache.probs, rtol=1e-5, atol=1e-7)
    assert kept_cache.probs.shape[-1] == 97


@pytest.mark.parametrize("saguaro_c", [1.0, 0.3])
def test_filtered_steps_of_a_restricted_head_sample_its_kept_columns(tiny_checkpoints, saguaro_c):
    """Top-k / top-p tree steps of a restricted head look for their candidates among the kept
    tokens' logits only, and must give the branches' tokens and the cached q of the -inf-filled
    full rows (with Saguaro's C < 1 too)."""
    from ssd import SamplingParams
    kept_cache, full_cache = caches_of_kept_columns_and_full_rows(
        tiny_checkpoints["llama"], [SamplingParams(temperature=0.8, top_p=0.9, seed=3),
                                    SamplingParams(temperature=1.3, top_k=12, seed=4)], saguaro_c)
    assert kept_cache.probs.ids.shape[-1] == len(RESTRICTED) < full_cache.probs.ids.shape[-1]
    assert torch.equal(kept_cache.tokens, full_cache.tokens)
    torch.testing.assert_close(kept_cache.probs.dense(), full_cache.probs.dense(), rtol=1e-5, atol=1e-7)
    assert set(kept_cache.tokens.unique().tolist()) <= set(RESTRICTED)


def test_a_tree_round_holds_what_each_step_would_build(tiny_checkpoints):
    """The inputs every step shares, built once per round: step m's positions, scratch entries and
    RoPE rows, and the rows' key ends."""
    from ssd.layers.attention import keys_end_of
    runner = runner_for(tiny_checkpoints["llama"], scratch_len=24)
    prefix_limit = torch.tensor([[3, 4, 4], [7, 8, 9]])
    entry = torch.tensor([128, 132, 136])
    steps = runner.tree_round(prefix_limit, entry, 4)
    for depth in range(4):
        positions = prefix_limit + 1 + depth
        assert torch.equal(steps.positions[depth], positions)
        assert torch.equal(steps.write_index[depth], (entry + depth).expand(2, 3))
        cos, sin = runner.model.model.rotary(positions)
        assert torch.equal(steps.cos[depth], cos) and torch.equal(steps.sin[depth], sin)
        tree = steps.context(depth, 128, torch.ones(3, 12, dtype=torch.bool))
        assert (tree.depth, tree.branch_len) == (depth, 4)
    assert torch.equal(steps.keys_end, keys_end_of(prefix_limit)) and steps.keys_end.tolist() == [5, 10]
