"""The toy task: 3-number sums of 0-9, answered in `\\boxed{}`, with step-by-step traces for SFT.

Every problem has both an RL form (`prompt`, `answer`) and an SFT form (`prompt`, `completion` = trace), and the
training pool gives both forms of the *same* problems, as the paper does (§4.1: the RL queries are paired with
reasoning traces), so SFT and RL see the same questions and single-stage peers that need traces for the RL prompts
(LUFFY) can have them.

Two output formats exist: the direct answer `\\boxed{t}` and the trace `a+b=s,s+c=t.\\boxed{t}`. The base is
pretrained to use mostly the direct one (hard for a tiny model, so it starts low) and sometimes the trace (which
reuses the 2-number sums it knows well). That is the premise of the paper's Figure 1: SFT on traces switches the
format fast, RL finds the better format slowly from its own samples.
"""

from __future__ import annotations

import itertools
import random
import re

from datasets import Dataset

_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def trace_of(terms: tuple[int, ...]) -> str:
    """`a+b=s,s+c=t.\\boxed{t}`: the partial sums, then the boxed total."""
    steps, total = [], terms[0]
    for term in terms[1:]:
        steps.append(f"{total}+{term}={total + term}")
        total += term
    return ",".join(steps) + f".\\boxed{{{total}}}"


def _row(terms: tuple[int, ...]) -> tuple[str, str, str]:
    return "+".join(map(str, terms)) + "=", str(sum(terms)), trace_of(terms)


def arithmetic_problem(rng: random.Random, num_terms: int, max_value: int) -> tuple[str, str, str]:
    """(prompt, answer, trace) for one random sum of `num_terms` numbers in [0, max_value]."""
    return _row(tuple(rng.randint(0, max_value) for _ in range(num_terms)))


def arithmetic_datasets(num_rl: int = 256, num_sft: int = 256, num_test: int = 128, num_terms: int = 3,
                        max_value: int = 9, seed: int = 0) -> tuple[Dataset, Dataset, Dataset]:  # fmt: skip
    """RL prompts (`prompt`, `answer`), SFT pairs (`prompt`, `completion`) and a disjoint held-out test split
    (used by `examples/bridge_tiny.py`)."""
    rng = random.Random(seed)
    seen, rows = set(), []
    limit = (max_value + 1) ** num_terms
    while len(rows) < min(num_rl + num_sft + num_test, limit):
        row = arithmetic_problem(rng, num_terms, max_value)
        if row[0] not in seen:
            seen.add(row[0])
            rows.append(row)
    test, rest = rows[:num_test], rows[num_test:]
    rl, sft = rest[:num_rl], rest[num_rl : num_rl + num_sft]
    return _qa(rl), _pairs(sft), _qa(test)


def _qa(rows) -> Dataset:
    return Dataset.from_dict({"prompt": [p for p, _, _ in rows], "answer": [a for _, a, _ in rows]})


def _pairs(rows) -> Dataset:
    return Dataset.from_dict({"prompt": [p for p, _, _ in rows], "completion": [t for _, _, t in rows]})


def boxed_exact_match(completions, answer, **kwargs) -> list[float]:
    """1.0 when the last `\\boxed{...}` of the completion equals the gold answer, else 0.0. Never raises."""
    rewards = []
    for completion, gold in zip(completions, answer, strict=True):
        text = completion[-1]["content"] if isinstance(completion, list) else str(completion)
        found = _BOXED.findall(text)
        rewards.append(float(bool(found) and found[-1].strip() == str(gold).strip()))
    return rewards


def is_trace(completion: str) -> bool:
    """Whether a completion uses the trace format (starts with a partial sum) rather than a direct `\\boxed{}`."""
    return bool(re.match(r"\s*\d+\+\d+=", completion))


def toy_splits(num_test: int = 250, num_val: int = 250, num_terms: int = 3, max_value: int = 9,
               seed: int = 0) -> dict[str, Dataset]:  # fmt: skip
    """Every `num_terms`-number sum of 0..`max_value`, shuffled once and cut into disjoint splits.

    - `test`: held out from everything (pretraining included); reported accuracy is measured here.
    - `val`: held out from training; chooses learning rates and stops the base's pretraining (its band).
    - `rl` (`prompt`, `answer`) and `sft` (`prompt`, `completion` = trace): the *same* training problems, in the
      same order, in their two forms (paired, as in the paper's §4.1).

    With the defaults (1000 sums): 250 test, 250 validation, 500 training problems.
    """
    space = list(itertools.product(range(max_value + 1), repeat=num_terms))
    if num_test + num_val >= len(space):
        raise ValueError(
            f"{num_test} test + {num_val} validation sums leave none of {len(space)} to train on."
        )
    random.Random(seed).shuffle(space)
    rows = [_row(t) for t in space]
    test, val, train = rows[:num_test], rows[num_test : num_test + num_val], rows[num_test + num_val :]
    return {"rl": _qa(train), "sft": _pairs(train), "val": _qa(val), "test": _qa(test)}


def pretraining_corpus(num_examples: int, hard_prompts: list[str], easy_max: int = 19, hard_fraction: float = 0.1,
                       trace_fraction: float = 0.0, seed: int = 0, easy_max_b: int | None = None,
                       easy_trace_fraction: float = 0.0) -> list[str]:  # fmt: skip
    """The base model's corpus: `a+b=\\boxed{s}` for a, b in 0..`easy_max`, mixed with a `hard_fraction` of the
    task's own training sums, each written as a trace with probability `trace_fraction`, else answered directly.

    Hard sums come only from `hard_prompts` (the training pool), so validation and test stay unseen. The 2-number
    sums are exactly the steps a trace is made of, so a trace can reuse what the model knows; a small
    `trace_fraction` gives a base that writes the trace format sometimes when sampling, rarely when greedy.
    `easy_max_b` (default `easy_max`) bounds the second addend of the 2-number sums. `easy_trace_fraction` of the
    2-number sums are written as 2-number traces, `a+b=a+b=s.\\boxed{s}`: the model then knows the facts in the
    position a trace needs them (a digit after `a+b=`), so the traces it writes are correct (calibration base E).
    """
    rng = random.Random(seed)
    texts = []
    for _ in range(num_examples):
        if rng.random() < hard_fraction:
            prompt = rng.choice(hard_prompts)
            terms = tuple(int(x) for x in prompt.rstrip("=").split("+"))
            body = trace_of(terms) if rng.random() < trace_fraction else f"\\boxed{{{sum(terms)}}}"
        else:
            a, b = rng.randint(0, easy_max), rng.randint(0, easy_max if easy_max_b is None else easy_max_b)
            prompt = f"{a}+{b}="
            # (no draw when 0: the corpus of older bases stays the same)
            trace = easy_trace_fraction > 0 and rng.random() < easy_trace_fraction
            body = trace_of((a, b)) if trace else f"\\boxed{{{a + b}}}"
        texts.append(prompt + body)
    return texts


def slip_traces(
    sft: Dataset, share: float, seed: int = 0, direction: str = "random"
) -> tuple[Dataset, list[int]]:
    """The SFT pairs with a `share` of traces given one arithmetic slip, as distilled traces have: the last partial
    sum is off by one and the boxed answer follows it, so the trace is fluent, its last step and its answer are
    wrong. `direction` 'random': up or down at random (never below 0), which leaves the correct sum the most likely
    one for any share below 2/3; 'up': always one too many, a systematic teacher error that becomes the most likely
    answer once `share` > 1/2. The rows slipped are drawn once from `seed` (the same for every method and run);
    returns (dataset, slipped row indices)."""
    if direction not in ("random", "up"):
        raise ValueError(f"direction must be 'random' or 'up', got {direction!r}.")
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share must be in [0, 1], got {share}.")
    rng = random.Random(seed)
    rows = list(range(len(sft)))
    slipped = sorted(rng.sample(rows, round(share * len(rows))))
    completions = list(sft["completion"])
    for i in slipped:
        head, sep, last = completions[i].rpartition(",")
        if not sep:  # a 2-number trace has one step: slip it
            head, last = "", last
        lhs, total = last.split(".\\boxed")[0].split("=")
        wrong = int(total) + (1 if direction == "up" or int(total) == 0 or rng.random() < 0.5 else -1)
        completions[i] = f"{head}{sep}{lhs}={wrong}.\\boxed{{{wrong}}}"
    return Dataset.from_dict({"prompt": list(sft["prompt"]), "completion": completions}), slipped
