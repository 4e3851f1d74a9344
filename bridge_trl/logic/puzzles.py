"""Knights-and-Knaves puzzles from reasoning-gym, with solver-written SFT traces, as a TRL dataset.

`knights_knaves(n, num_people, seed)` draws puzzles from reasoning-gym's `knights_knaves` generator (adapted from
mem-kk-logic; statements nested to depth 2, at most 2 parts per connective, exactly one solution) and returns a
`datasets.Dataset` with one row per puzzle:

| column | what |
|---|---|
| `prompt` | `[{"role": "user", "content": question + answer instruction}]` (TRL's conversational format) |
| `completion` | `[{"role": "assistant", "content": trace}]`: the solver's reasoning, a check, `<answer>...</answer>` |
| `solution` | one role per person in order, `"knight"` (truthful) or `"knave"` (lying) |
| `names`, `roles` | the people, and the puzzle's words for the two roles (e.g. `["saint", "sinner"]`) |
| `num_people`, `statements`, `answer`, `source_index` | size, the statements as JSON, the answer text, the generator's index |

Every row is checked when it is made: the solver's roles equal the brute-force solution (which must be unique)
and reasoning-gym's own, and `logic_reward` scores the trace 1. A failed check raises: no unverified trace is
ever written. No two puzzles of a call are the same puzzle (`puzzle_key`: the same statements up to the order of "and"/"or"
parts and, for up to 5 people, up to renaming the people); `exclude` keeps more keys out.
"""

from __future__ import annotations

import itertools
import json
import logging

from .rewards import logic_reward
from .solver import prove, solutions
from .trace import ANSWER_CLOSE, ANSWER_OPEN, Vocabulary, answer_text, write_trace

logger = logging.getLogger(__name__)

INSTRUCTION = (
    f"Reason step by step, then give your final answer inside {ANSWER_OPEN}{ANSWER_CLOSE} tags, in the format "
    "given above."
)
MIN_PEOPLE, MAX_PEOPLE = 2, 12  # one person has no unique puzzle; the brute-force check is 2^n
RELABEL_MAX_PEOPLE = 5  # 120 relabellings; beyond, collisions are rare and the search costly
MAX_DRAWS_PER_PUZZLE = (
    100  # duplicates and excluded puzzles are skipped; give up (an error) long before forever
)


def _plain(x):
    """reasoning-gym's metadata holds numpy scalars: plain Python, so that rows serialise."""
    if isinstance(x, (list, tuple)):
        return tuple(_plain(v) for v in x)
    if hasattr(x, "item"):
        return x.item()
    return x


def statements_key(statements) -> str:
    """The text of a puzzle's statements (by person index: names and role words do not count)."""
    return json.dumps(_plain(statements), separators=(",", ":"))


def _relabelled(stmt, perm) -> list:
    if stmt[0] in ("telling-truth", "lying"):
        return [stmt[0], perm[stmt[1]]]
    parts = [_relabelled(s, perm) for s in stmt[1:]]
    if stmt[0] in ("and", "or", "<=>"):  # the order of their parts says nothing
        parts.sort(key=json.dumps)
    return [stmt[0], *parts]


def puzzle_key(statements) -> str:
    """A key equal for puzzles that are the same up to the order of commutative parts and, for up to
    `RELABEL_MAX_PEOPLE` people, up to who is who (the smallest key over all relabellings). Larger puzzles are
    compared as labelled: among 1,000 draws of 4 or 5 people no two were relabellings of each other."""
    statements = _plain(statements)
    n = len(statements)
    perms = itertools.permutations(range(n)) if n <= RELABEL_MAX_PEOPLE else [tuple(range(n))]
    keys = []
    for perm in perms:
        relabelled = [None] * n
        for i, stmt in enumerate(statements):
            relabelled[perm[i]] = _relabelled(stmt, perm)
        keys.append(json.dumps(relabelled, separators=(",", ":")))
    return min(keys)


def _generator(num_people: int, seed: int):
    try:
        from reasoning_gym.logic.knights_knaves import KnightsKnavesConfig, KnightsKnavesDataset
    except ImportError as err:
        raise ImportError(
            "The logic kit draws its puzzles from reasoning-gym: pip install -e '.[logic]' "
            "(or pip install reasoning-gym==0.1.25)."
        ) from err
    # `size` only bounds the generator's own iteration; items are made on demand by index.
    config = KnightsKnavesConfig(
        n_people=num_people, depth_constraint=2, width_constraint=2, seed=seed, size=2**31
    )
    return KnightsKnavesDataset(config)


def make_row(item: dict) -> dict:
    """One dataset row from a reasoning-gym item, with its verified trace."""
    meta = item["metadata"]
    statements = _plain(meta["statements"])
    names = [str(n) for n in meta["names"]]
    voc = Vocabulary(str(meta["knight_knave_terms"]["knight"]), str(meta["knight_knave_terms"]["knave"]))
    where = f"reasoning-gym knights_knaves item {meta['source_index']} ({len(names)} people)"
    truth = solutions(statements)
    if len(truth) != 1:
        raise ValueError(f"{where} has {len(truth)} solutions; a puzzle must have exactly one.")
    proof = prove(statements)
    if proof.roles != truth[0] or proof.roles != tuple(bool(v) for v in meta["solution"]):
        raise AssertionError(f"{where}: the solver's roles {proof.roles} disagree with the brute force "
                             f"{truth[0]} or reasoning-gym's {tuple(meta['solution'])}.")  # fmt: skip
    trace = write_trace(statements, names, voc, proof)
    solution = ["knight" if r else "knave" for r in proof.roles]
    roles = [voc.knight, voc.knave]
    if logic_reward([trace], solution=[solution], names=[names], roles=[roles]) != [1.0]:
        raise AssertionError(f"{where}: the written trace does not score 1:\n{trace}")
    return {
        "prompt": [{"role": "user", "content": f"{item['question']}\n\n{INSTRUCTION}"}],
        "completion": [{"role": "assistant", "content": trace}],
        "solution": solution,
        "names": names,
        "roles": roles,
        "num_people": len(names),
        "statements": statements_key(statements),
        "answer": answer_text(names, proof.roles, voc),
        "source_index": int(meta["source_index"]),
    }


def knights_knaves_rows(n: int, num_people: int, seed: int = 0, exclude: set[str] | frozenset = frozenset()):
    """The rows of `knights_knaves` as dicts (see the module docstring)."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"`n` (number of puzzles) must be a positive integer, got {n!r}.")
    if not isinstance(num_people, int) or not MIN_PEOPLE <= num_people <= MAX_PEOPLE:
        raise ValueError(
            f"`num_people` must be an integer in [{MIN_PEOPLE}, {MAX_PEOPLE}], got {num_people!r}."
        )
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"`seed` must be a non-negative integer, got {seed!r}.")
    generator = _generator(num_people, seed)
    rows, seen, skipped = [], set(exclude), 0
    for index in range(n * MAX_DRAWS_PER_PUZZLE):
        if len(rows) == n:
            break
        item = generator[index]
        key = puzzle_key(item["metadata"]["statements"])
        if key in seen:
            skipped += 1
            continue
        seen.add(key)
        rows.append(make_row(item))
    if len(rows) < n:
        raise ValueError(
            f"Only {len(rows)} distinct {num_people}-person puzzles in {n * MAX_DRAWS_PER_PUZZLE} draws (seed "
            f"{seed}); ask for fewer."
        )
    logger.info("%d %d-person puzzles (seed %d; %d repeats skipped)", n, num_people, seed, skipped)
    return rows


def knights_knaves(n: int, num_people: int, seed: int = 0, exclude: set[str] | frozenset = frozenset()):
    """`n` distinct verified `num_people`-person puzzles as a `datasets.Dataset` (columns: module docstring).

    Deterministic in (`num_people`, `seed`, `exclude`). `exclude` holds keys of puzzles to leave
    out: `puzzle_key`s (the splits use it to keep evaluation puzzles out of training).
    """
    from datasets import Dataset

    return Dataset.from_list(knights_knaves_rows(n, num_people, seed, exclude))
