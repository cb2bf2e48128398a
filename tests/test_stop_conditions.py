"""Stop strings and stop token ids: a request ends at the token that completes one, also when a
speculative round accepts several tokens past it, and its text leaves the stop out (vLLM's semantics)."""
import pytest

from ssd import LLM, SamplingParams
from ssd.engine.sequence import Sequence
from ssd.engine.stop_strings import StopStringWatch, output_text
from tiny_models import add_word_tokenizer, make_checkpoint, perturbed_copy

EOS = 0


class ByteTokenizer:
    """Token = one UTF-8 byte: decoding part of a character gives U+FFFD, as byte-level BPE does."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(i for i in ids if not (skip_special_tokens and i == EOS)).decode("utf-8", errors="replace")


def byte_sequence(**params) -> Sequence:
    params = SamplingParams(**{"max_tokens": 64, **params})
    watch = StopStringWatch(ByteTokenizer(), params.stop) if params.stop else None
    return Sequence(0, [65], params, frozenset({EOS}), watch)


def ids(text: str) -> list[int]:
    return list(text.encode())


def text_of(seq: Sequence) -> str:
    return output_text(ByteTokenizer(), seq.output_ids, seq.params, seq.stop_reason)


def test_stop_string_inside_one_round_keeps_tokens_through_the_one_completing_it():
    seq = byte_sequence(stop=["cd"])
    assert seq.append(ids("abcdef")) == 4
    assert seq.output_ids == ids("abcd")
    assert (seq.finish_reason, seq.stop_reason, text_of(seq)) == ("stop", "cd", "ab")


def test_stop_string_completed_across_rounds():
    seq = byte_sequence(stop=["abc"])
    assert seq.append(ids("xxa")) == 3 and not seq.finished
    assert seq.append(ids("bcq")) == 2
    assert (seq.output_ids, seq.stop_reason, text_of(seq)) == (ids("xxabc"), "abc", "xx")


def test_the_stop_string_completed_first_wins_and_can_be_kept_in_the_text():
    seq = byte_sequence(stop=["bcd", "c"], include_stop_str_in_output=True)
    seq.append(ids("abcd"))
    assert (seq.output_ids, seq.stop_reason, text_of(seq)) == (ids("abc"), "c", "abc")


def test_multibyte_stop_string_split_mid_character():
    seq = byte_sequence(stop=["é!"])
    word = ids("café!x")
    assert seq.append(word[:4]) == 4 and not seq.finished   # "caf" + half of "é"
    assert seq.append(word[4:]) == 2
    assert (seq.output_ids, text_of(seq)) == (word[:6], "caf")


def test_stop_token_ids_end_the_request_even_with_ignore_eos():
    seq = byte_sequence(stop_token_ids=[ord("c")], ignore_eos=True)
    assert seq.append(ids("ab") + [EOS] + ids("cd")) == 4
    assert (seq.finish_reason, seq.stop_reason, text_of(seq)) == ("stop", ord("c"), "ab")
    kept = byte_sequence(stop_token_ids=ord("c"), include_stop_str_in_output=True)
    kept.append(ids("abcd"))
    assert text_of(kept) == "abc"


@pytest.mark.parametrize("tokens, kept, reason", [
    (ids("ab") + [EOS] + ids("zz"), 3, None),   # EOS first
    (ids("zz") + [EOS], 2, "zz"),               # the stop string first
])
def test_eos_and_stop_string_in_one_round_whichever_comes_first(tokens, kept, reason):
    seq = byte_sequence(stop=["zz"])
    assert seq.append(tokens) == kept
    assert (seq.finish_reason, seq.stop_reason) == ("stop", reason)


def test_max_tokens_before_the_stop_string_completes():
    seq = byte_sequence(stop=["cd"], max_tokens=3)
    assert seq.append(ids("abcd")) == 3
    assert (seq.finish_reason, seq.stop_reason, text_of(seq)) == ("length", None, "abc")


@pytest.mark.parametrize("params, error", [
    (dict(stop=""), "stop must be"), (dict(stop=[3]), "stop must be"), (dict(stop={"a"}), "stop must be"),
    (dict(stop_token_ids=[-1]), "stop_token_ids must be"), (dict(stop_token_ids=["a"]), "stop_token_ids must be"),
    (dict(stop_token_ids=[True]), "stop_token_ids must be"), (dict(include_stop_str_in_output=1), "must be a bool"),
])
def test_invalid_stop_parameters_are_refused(params, error):
    with pytest.raises(ValueError, match=error):
        SamplingParams(**params)


def test_stop_parameters_accept_none_one_value_or_a_list():
    assert SamplingParams(stop=None, stop_token_ids=None).stop == ()
    assert SamplingParams(stop="x", stop_token_ids=5).stop_token_ids == (5,)
    assert SamplingParams(stop=["x", "y"]).stop == ("x", "y")


# ---------------------------------------------------------------- through the engine, every mode
PROMPTS = [[5, 6, 7], [9] * 11, list(range(3, 30)), [40, 41]]
LONG = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    root = tmp_path_factory.mktemp("stops")
    target = add_word_tokenizer(make_checkpoint("qwen3", root / "target"))   # qwen3 keeps the saved tokenizer
    draft = perturbed_copy(target, root / "draft", noise=0.08)
    with LLM(str(target), max_model_len=128, max_num_seqs=4, draft=str(draft), num_speculative_tokens=3,
             async_spec=True, fan_out=2) as llm:
        yield llm


def expected_stop(llm, tokens: list[int], params: SamplingParams) -> tuple[list[int], str, object]:
    """Reference: the shortest prefix of the unstopped output whose text holds a stop string (or that
    ends in a stop token id), and the text it gives."""
    decode = lambda ids: llm.tokenizer.decode(ids, skip_special_tokens=True)   # noqa: E731
    for end in range(1, len(tokens) + 1):
        if tokens[end - 1] in params.stop_token_ids:
            return tokens[:end], decode(tokens[:end - 1]), tokens[end - 1]
        found = sorted((decode(tokens[:end]).find(s), s) for s in params.stop if s in decode(tokens[:end]))
        if found:
            position, string = found[0]
            return tokens[:end], decode(tokens[:end])[:position], string
    return tokens, decode(tokens), None


@pytest.mark.parametrize("mode", ["ar", "sync", "async"])
def test_requests_stop_at_the_same_token_in_every_mode(llm, mode):
    base = [o.token_ids for o in llm.generate(PROMPTS, LONG, use_tqdm=False, mode="ar")]
    word = lambda t: f"w{t}"   # noqa: E731   (the test tokenizer's text of token t)
    stops = [dict(stop=f"{word(base[0][5])} {word(base[0][6])}"), dict(stop_token_ids=[base[1][9]]),
             dict(stop=["w1000", word(base[2][2])]), dict(stop="no such words")]
    params = [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, **stop) for stop in stops]
    outputs = llm.generate(PROMPTS, params, use_tqdm=False, mode=mode)
    for output, tokens, sp in zip(outputs, base, params):
        kept, text, reason = expected_stop(llm, tokens, sp)
        assert (output.token_ids, output.text, output.stop_reason) == (kept, text, reason)
        assert output.finish_reason == ("length" if reason is None else "stop")
    assert outputs[0].finish_reason == outputs[1].finish_reason == outputs[2].finish_reason == "stop"


@pytest.mark.parametrize("mode", ["ar", "sync", "async"])
def test_prefill_finishing_every_request_runs_no_round(llm, mode):
    """max_tokens = 1 (or a first token that stops): prefill's token ends the request, no decode or
    speculation round runs for it; beside unfinished requests, those go on as usual."""
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    base = [o.token_ids for o in llm.generate(PROMPTS, LONG, use_tqdm=False, mode="ar")]
    outputs = llm.generate(PROMPTS, one, use_tqdm=False, mode=mode)
    assert [o.token_ids for o in outputs] == [b[:1] for b in base]
    assert llm.last_run_stats.num_rounds == 0
    mixed = [one, LONG, one, LONG]
    assert [o.token_ids for o in llm.generate(PROMPTS, mixed, use_tqdm=False, mode=mode)] == \
        [b[:1] if p is one else b for b, p in zip(base, mixed)]


def test_out_of_vocabulary_stop_token_ids_are_refused(llm):
    with pytest.raises(ValueError, match=r"stop_token_ids must lie in \[0, 97\)"):
        llm.generate(PROMPTS[:1], SamplingParams(stop_token_ids=[97]), use_tqdm=False)


def test_stop_strings_need_a_tokenizer(tmp_path):
    with LLM(str(make_checkpoint("llama", tmp_path / "bare")), max_model_len=64) as bare:
        with pytest.raises(ValueError, match="stop strings need a tokenizer"):
            bare.generate([[5, 6]], SamplingParams(stop="x", max_tokens=4), use_tqdm=False)
