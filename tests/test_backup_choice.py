"""`--backup auto` takes the backup with more expected tokens per second, from the measured hit
rate, round time, backup waits and acceptance of neural and n-gram proposals."""
from ssd.draft_worker.backup_choice import EXPLORE_EVERY, HALF_LIFE_ROUNDS, PRIOR_ROWS, BackupChooser, Tally, fading


def chooser(hits: int, lookups: int, round_ms: float, jit_ms: float, draft_accepts: float, ngram_accepts: float,
            k: int = 6) -> BackupChooser:
    c = BackupChooser(k)
    c.observe_lookups(hits, lookups)
    for _ in range(10):
        c.observe_round(round_ms / 2e3, round_ms / 2e3)
    c.observe_wait("jit", jit_ms / 1e3)
    c.observe_wait("fast", 0.0003)
    c.observe_proposals([round(draft_accepts)] * 100, [False] * 100)
    c.observe_proposals([round(ngram_accepts)] * 100, [True] * 100)
    return c


def test_small_batch_with_a_good_hit_rate_drafts_its_misses():
    assert chooser(80, 100, round_ms=20, jit_ms=7, draft_accepts=4, ngram_accepts=0).choose(1) == "jit"


def test_large_batch_takes_the_near_free_backup():
    # p^16 ~ 0.03: nearly every round would wait for a jit draft
    assert chooser(80, 100, round_ms=20, jit_ms=7, draft_accepts=4, ngram_accepts=0).choose(16) == "fast"


def test_the_costs_decide_not_only_the_batch_size():
    # the same hit rate and batch: a jit draft as long as the round is not worth it ...
    assert chooser(50, 100, round_ms=5, jit_ms=5, draft_accepts=3, ngram_accepts=1).choose(1) == "fast"
    # ... a cheap one is
    assert chooser(50, 100, round_ms=20, jit_ms=1, draft_accepts=3, ngram_accepts=1).choose(1) == "jit"
    # and n-gram proposals accepted as well as the draft's make jit pointless
    assert chooser(50, 100, round_ms=20, jit_ms=1, draft_accepts=3, ngram_accepts=3).choose(1) == "fast"


def test_priors_try_the_n_gram_first_and_measurements_correct_them():
    c = BackupChooser(6)
    c.observe_round(0.010, 0.010)   # a 10 ms build: the jit prior is 6/7 of it
    assert c.choose(1) == c.choose(16) == "fast"   # the priors lean to the arm that is otherwise never measured
    c.observe_lookups(80, 100)
    c.observe_proposals([0] * 50 + [4] * 50, [True] * 50 + [False] * 50)   # n-grams rejected, drafts accepted
    assert c.choose(1) == "jit" and c.choose(16) == "fast"
    c.observe_wait("jit", 0.200)    # measured: a jit draft takes far longer than the prior said
    assert c.choose(1) == "fast"


def test_the_arm_not_chosen_is_tried_now_and_then_until_measured():
    c = chooser(80, 100, round_ms=20, jit_ms=7, draft_accepts=4, ngram_accepts=0)
    c.waits["jit"] = fading()         # jit never measured: its prior stands in
    choices = [c.choose(16) for _ in range(EXPLORE_EVERY * 3)]
    assert choices.count("jit") == 3 and choices[EXPLORE_EVERY - 1] == "jit"
    for _ in range(PRIOR_ROWS):
        c.observe_wait("jit", 0.007)
    assert {c.choose(16) for _ in range(EXPLORE_EVERY * 2)} == {"fast"}   # measured enough: no more tries


def test_measurements_fade_with_age():
    tally = Tally(half_life=10)
    tally.add(100.0, 100, now=0)
    assert tally.mean(0.0, now=10) == 1.0 and tally.weight(now=10) == 50.0   # half the weight, same mean
    tally.add(0.0, 100, now=10)
    assert abs(tally.mean(0.0, now=10) - 1 / 3) < 1e-9                     # the newer observations count double
    assert tally.weight(now=200) < 1e-3
    assert Tally(half_life=10).mean(2.0, now=5) == 2.0                       # nothing observed: the default
    never = Tally()
    never.add(1.0, 1, now=0)
    assert never.weight(now=10 ** 6) == 1


def play(c: BackupChooser, rounds: int, ngram_accepts: int, draft_accepts: int = 4) -> list[str]:
    """Batch-1 rounds of 20 ms that hit half the time: a jit backup waits 7 ms, an n-gram proposal
    gets ngram_accepts tokens accepted (a workload the n-gram copies from well, or not)."""
    choices = []
    for r in range(rounds):
        c.observe_round(0.010, 0.010)
        backup = c.choose(1)
        choices.append(backup)
        hit = r % 2 == 0
        c.observe_lookups(int(hit), 1)
        if not hit:
            c.observe_wait(backup, 0.007 if backup == "jit" else 0.0003)
        ngram = not hit and backup == "fast"
        c.observe_proposals([ngram_accepts if ngram else draft_accepts], [ngram])
    return choices


def settled(choices: list[str], backup: str, run: int = 20) -> int:
    """The first round of `run` rounds in a row that chose `backup`."""
    return next(i for i in range(len(choices)) if choices[i:i + run] == [backup] * run)


def test_auto_follows_a_workload_that_changes():
    """Each phase settles on its better arm within a few half-lives of the measurements, and then
    tries the other one at most every EXPLORE_EVERY-th round."""
    c = BackupChooser(6)
    tries = 128 // EXPLORE_EVERY
    code = play(c, 2000, ngram_accepts=4)                 # n-grams as good as the draft: free
    assert settled(code, "fast") < 2 * HALF_LIFE_ROUNDS and code[-128:].count("jit") <= tries
    prose = play(c, 6 * HALF_LIFE_ROUNDS, ngram_accepts=0)   # n-grams rejected from now on
    assert settled(prose, "jit") < 2 * HALF_LIFE_ROUNDS and prose[-128:].count("fast") <= tries
    code = play(c, 6 * HALF_LIFE_ROUNDS, ngram_accepts=4)    # copying again: found by the tries
    assert settled(code, "fast") < 2 * HALF_LIFE_ROUNDS and code[-128:].count("jit") <= tries
