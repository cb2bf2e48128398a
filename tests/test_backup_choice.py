"""`--backup auto` takes the backup with more expected tokens per second, from the measured hit
rate, round time, backup waits and acceptance of neural and n-gram proposals."""
from ssd.draft_worker.backup_choice import EXPLORE_EVERY, PRIOR_ROWS, BackupChooser, Tally


def chooser(hits: int, lookups: int, round_ms: float, jit_ms: float, draft_accepts: float, ngram_accepts: float,
            k: int = 6) -> BackupChooser:
    c = BackupChooser(k)
    c.lookups.add(hits, lookups)
    for _ in range(10):
        c.observe_round(round_ms / 2e3, round_ms / 2e3)
    c.waits["jit"].add(jit_ms / 1e3)
    c.waits["fast"].add(0.0003)
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
    c.lookups.add(80, 100)
    c.observe_proposals([0] * 50 + [4] * 50, [True] * 50 + [False] * 50)   # n-grams rejected, drafts accepted
    assert c.choose(1) == "jit" and c.choose(16) == "fast"
    c.waits["jit"].add(0.200)       # measured: a jit draft takes far longer than the prior said
    assert c.choose(1) == "fast"


def test_the_arm_not_chosen_is_tried_now_and_then_until_measured():
    c = chooser(80, 100, round_ms=20, jit_ms=7, draft_accepts=4, ngram_accepts=0)
    c.waits["jit"] = Tally()          # jit never measured: its prior stands in
    choices = [c.choose(16) for _ in range(EXPLORE_EVERY * 3)]
    assert choices.count("jit") == 3 and choices[EXPLORE_EVERY - 1] == "jit"
    for _ in range(PRIOR_ROWS):
        c.waits["jit"].add(0.007)
    assert {c.choose(16) for _ in range(EXPLORE_EVERY * 2)} == {"fast"}   # measured enough: no more tries
