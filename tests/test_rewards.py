"""The accuracy reward: gold normalisation, equivalence on labelled pairs, the peer cases, adversarial
inputs from the main thread and from worker threads, the hard-kill path, and TRL integration hooks."""

import json
import logging
import pickle
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from bridge_trl.maths.rewards import (
    AccuracyReward,
    MathVerifier,
    accuracy_reward,
    answer_text,
    completion_text,
    last_boxed,
    make_accuracy_reward,
    normalize_gold,
)

from .conftest import SHARED_DATA, needs_shared_data

TIMEOUT_S = 3.0

ADVERSARIAL = [
    r"\boxed{9^{9^{9^{9^{9}}}}}",
    r"\boxed{10^{10^{10}}!}",
    r"The answer is \boxed{\frac{9^{9^{9}}}{9^{9^{9}-1}}}",
    r"\boxed{{{{{{",
    "}" * 2000 + r"\boxed{" * 2000,
    r"\boxed{" + "(" * 5000 + ")" * 5000 + "}",
    "\\frac{1}{" * 3000 + "}" * 3000,
    "x" * (1 << 20),  # a megabyte of text
    "1+" * 300_000 + "1",
    r"\boxed{3" + "\x00" * 100 + "}",
    "\x00" * 1000,
    "$" * 100_000,
    "",
]


@pytest.fixture(scope="module")
def patient_reward():
    """Default-like limits, for agreement tests: a busy machine must not turn slow parses into misses."""
    fn = make_accuracy_reward(timeout_s=20, num_workers=2)
    yield fn
    fn.verifier.close()


@pytest.fixture(scope="module")
def reward():
    """One pool for the module: workers start once (about a second each)."""
    fn = make_accuracy_reward(timeout_s=TIMEOUT_S, num_workers=2)
    yield fn
    fn.verifier.close()


# ---------------------------------------------------------------------------------------------- golds
@pytest.mark.parametrize(
    ("gold", "expected"),
    [
        ("033", r"\boxed{33}"),  # AIME: zero-padded
        (27.0, r"\boxed{27}"),  # AMC23: floats
        (0.5, r"\boxed{0.5}"),
        (12, r"\boxed{12}"),
        (r"\frac{1}{2}", r"\boxed{\frac{1}{2}}"),
        (["$69$,$84$"], r"\boxed{69, 84}"),  # OlympiadBench: list of $-wrapped strings
        ("$f(n)=n$, $g(n)=1$", r"\boxed{f(n)=n, g(n)=1}"),
        ("$1$ and $2$ and $3$", r"\boxed{1, 2, 3}"),
        (r"\boxed{3}", r"\boxed{3}"),  # already boxed: as written
        ("$125$ miles", "$125$ miles"),  # prose around math: as written
        (r"\$5", r"\boxed{\$5}"),  # an escaped dollar is not a delimiter
        ("", ""),
        (None, ""),
    ],
)
def test_normalize_gold(gold, expected):
    assert normalize_gold(gold) == expected


def test_answer_text_is_plain_and_round_trips():
    assert answer_text(27.0) == "27"
    assert answer_text("033") == "33"
    assert answer_text(["$\\frac{1}{2}$"]) == "\\frac{1}{2}"
    for gold in ("033", 27.0, ["$69$,$84$"], r"\frac{1}{2}", r"\boxed{3}"):
        assert normalize_gold(answer_text(gold)) == normalize_gold(gold)


def test_last_boxed_and_completion_text():
    assert last_boxed(r"a \boxed{1} b \boxed{\frac{1}{x^{2}}} c") == r"\frac{1}{x^{2}}"
    assert last_boxed(r"\boxed{1} then \boxed{2") == "1"  # an unbalanced last box falls back
    assert last_boxed("no box") is None
    assert completion_text([{"role": "assistant", "content": "hi"}]) == "hi"
    assert completion_text(None) == ""


# ------------------------------------------------------------------------------------ labelled pairs
# Boxes less than 70 characters apart with a separator between them are joined by math-verify into one
# set answer (that is how multi-answer golds match); a revision further on replaces the earlier box.
REVISED = (
    r"I guessed \boxed{26}. Checking the arithmetic once more, carefully, exposes a slip. Hence: \boxed{27}."
)
LABELLED = [
    (r"\frac{1}{3}", r"So the answer is $\boxed{\frac{1}{3}}$.", 1.0),
    (r"\frac{1}{3}", r"So the answer is $\boxed{\frac{1}{2}}$.", 0.0),
    ("033", r"The answer is $\boxed{33}$.", 1.0),  # AIME gold
    (27.0, r"They meet after $\boxed{27}$ miles.", 1.0),  # AMC gold
    ("27", REVISED, 1.0),  # the last box counts
    ("26", REVISED, 0.0),
    ("27", r"Either \boxed{26}, \boxed{27}", 0.0),  # listed boxes form one set answer: hedging earns nothing
    (r"\{26, 27\}", r"Either \boxed{26}, \boxed{27}", 1.0),
    ("5", r"Adding, $2+3=5$.", 1.0),  # no box: the last math expression
    (r"(3, \frac{\pi}{2})", r"$\boxed{\left( 3, \frac{\pi}{2} \right)}$", 1.0),
    (["$69$,$84$"], r"$\boxed{69, 84}$", 1.0),
    (r"\text{Evelyn}", r"$\boxed{\text{Evelyn}}$", 1.0),
    ("5", "I do not know.", 0.0),
    ("5", "", 0.0),
]


def test_labelled_pairs_plain_and_conversational(reward):
    golds = [g for g, _, _ in LABELLED]
    texts = [t for _, t, _ in LABELLED]
    expected = [e for _, _, e in LABELLED]
    assert reward(completions=texts, answer=golds) == expected
    conversational = [[{"role": "assistant", "content": t}] for t in texts]
    assert reward(prompts=[None] * len(texts), completions=conversational, answer=golds, extra=1) == expected


def test_plus_minus_one_variant_and_names():
    pm = make_accuracy_reward(correct=1.0, incorrect=-1.0, num_workers=1, name="accuracy_pm1")
    try:
        assert pm([r"\boxed{2}", r"\boxed{3}"], ["2", "2"]) == [1.0, -1.0]
        assert pm.__name__ == "accuracy_pm1"
    finally:
        pm.verifier.close()
    assert accuracy_reward.__name__ == "accuracy_reward"
    assert (accuracy_reward.correct, accuracy_reward.incorrect) == (1.0, 0.0)
    assert accuracy_reward.verifier._workers == []  # lazy: importing the module starts nothing


def test_unparseable_gold_scores_incorrect_with_a_warning(reward, caplog):
    with caplog.at_level(logging.WARNING, logger="bridge_trl.maths.pool"):
        assert reward(completions=[r"\boxed{1}", r"\boxed{1}"], answer=["", "\\boxed{"]) == [0.0, 0.0]
    assert caplog.text.count("could not parse the gold answer") == 2


def test_never_raises_on_odd_completion_types(reward):
    odd = [None, 42, {"content": r"\boxed{5}"}, [{"role": "assistant"}], [], "\ud800"]
    assert reward(completions=odd, answer=["5"] * len(odd)) == [0.0, 0.0, 1.0, 0.0, 0.0, 0.0]


def test_reward_pickles_without_its_pool(reward):
    reward(completions=[r"\boxed{1}"], answer=["1"])  # the pool is running
    clone = pickle.loads(pickle.dumps(reward))
    try:
        assert clone.__name__ == reward.__name__ and clone.verifier._workers == []
        assert clone([r"\boxed{4}"], ["4"]) == [1.0]
    finally:
        clone.verifier.close()


# ------------------------------------------------------------------------------------------ peer cases
@needs_shared_data("math_verify_cases.json")
def test_peer_cases_agreement(patient_reward):
    cases = json.loads((SHARED_DATA / "math_verify_cases.json").read_text())["cases"]
    scores = patient_reward(completions=[c["pred"] for c in cases], answer=[c["gold"] for c in cases])
    agree = [int(s) == c["expected"] for s, c in zip(scores, cases, strict=True)]
    boxed = [a for a, c in zip(agree, cases, strict=True) if "\\boxed" in c["pred"]]
    assert sum(boxed) / len(boxed) >= 0.97, f"boxed agreement {sum(boxed)}/{len(boxed)}"
    assert sum(agree) / len(agree) >= 0.90, f"overall agreement {sum(agree)}/{len(agree)}"


@needs_shared_data("benchmarks")
def test_every_benchmark_gold_verifies_against_itself(patient_reward):
    from bridge_trl.maths.evaluate import BENCHMARKS, load_benchmark

    golds = [p["gold"] for name in BENCHMARKS for p in load_benchmark(name, SHARED_DATA / "benchmarks")]
    assert len(golds) == 500 + 272 + 675 + 30 + 40
    verdicts = patient_reward.verifier.verify(golds, [normalize_gold(g) for g in golds])
    failures = [(g, v) for g, v in zip(golds, verdicts, strict=True) if not v.correct]
    assert not failures, failures[:5]


# ------------------------------------------------------------------------------- bounded time, threads
def test_adversarial_inputs_score_incorrect_in_bounded_time(reward):
    start = time.monotonic()
    scores = reward(completions=ADVERSARIAL, answer=["3"] * len(ADVERSARIAL))
    elapsed = time.monotonic() - start
    assert scores == [0.0] * len(ADVERSARIAL)
    # 13 inputs on 2 workers, each at most TIMEOUT_S (plus a respawn when killed).
    assert elapsed < len(ADVERSARIAL) * (TIMEOUT_S + 2) / 2 + 5


def test_adversarial_inputs_from_worker_threads(reward):
    def score(text):
        return reward(completions=[text, r"\boxed{3}"], answer=["3", "3"])

    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(score, ADVERSARIAL[:6]))
    assert results == [[0.0, 1.0]] * 6
    assert time.monotonic() - start < 6 * 2 * (TIMEOUT_S + 2) / 2 + 5


def test_a_hang_that_ignores_signals_is_killed_and_counted(reward):
    """A worker stuck where no signal reaches it (simulated: SIGALRM blocked) is killed at the deadline."""
    metrics = {}
    before = reward.num_timeouts
    results = {}

    def run():
        results["verdicts"] = reward.verifier._run(
            [("hang", 120), ("verify", (r"\boxed{1}", r"\boxed{1}", 3))]
        )

    start = time.monotonic()
    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert time.monotonic() - start < TIMEOUT_S + 10
    hang, ok = results["verdicts"]
    assert (hang.correct, hang.status) == (False, "timeout")
    assert ok.correct
    assert reward.num_timeouts == before + 1
    # The pool recovered, and TRL's `log_metric` hook receives the per-batch count.
    out = reward(completions=[r"\boxed{7}"], answer=["7"], log_metric=lambda k, v: metrics.__setitem__(k, v))
    assert out == [1.0]
    assert metrics == {"accuracy_reward/timeouts": 0.0}


def test_bad_worker_environment_is_a_clear_error(monkeypatch):
    import bridge_trl.maths.pool as pool

    monkeypatch.setattr(pool, "_BOOTSTRAP", "import sys; sys.exit(3)")
    verifier = MathVerifier(num_workers=1)
    with pytest.raises(RuntimeError, match="failed to start"):
        verifier.verify(["1"], [r"\boxed{1}"])
    verifier.close()


def test_accuracy_reward_is_an_accuracyreward():
    assert isinstance(accuracy_reward, AccuracyReward)
