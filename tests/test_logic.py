"""The logic kit: Knights-and-Knaves puzzles, the solver and its traces, the reward, the splits, the evaluation.

Every check is against an independent computation: reasoning-gym's own brute-force solver, a brute force over
completions of partial assignments, a relabelling search written here, or answers built here from the gold roles.
"""

import itertools
import json
import random
import time
from pathlib import Path

import pytest

pytest.importorskip("reasoning_gym")

from reasoning_gym.logic.knights_knaves import KnightsKnavesDataset  # noqa: E402

from bridge_trl.logic import data as logic_data  # noqa: E402
from bridge_trl.logic.puzzles import knights_knaves, knights_knaves_rows  # noqa: E402
from bridge_trl.logic.rewards import logic_reward, parse_roles  # noqa: E402
from bridge_trl.logic.solver import Case, evaluate, force, prove, value  # noqa: E402
from bridge_trl.logic.trace import ANSWER_CLOSE, ANSWER_OPEN, Vocabulary  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SIZES = range(2, 9)


@pytest.fixture(scope="module")
def puzzles():
    """520 verified puzzles: 70 of 2 people (of the 95 that exist), 75 of each of 3-8."""
    rows = []
    for people in SIZES:
        rows += knights_knaves_rows(70 if people == 2 else 75, people, seed=123)
    return rows


def reward(row, text, roles="row"):
    return logic_reward(
        [text],
        solution=[row["solution"]],
        names=[row["names"]],
        roles=[row["roles"] if roles == "row" else roles],
    )[0]


def gold(row) -> list[bool]:
    return [r == "knight" for r in row["solution"]]


def phrase(name, truthful, row):
    return f"{name} is {'a ' + row['roles'][0] if truthful else 'a ' + row['roles'][1]}"


# ---------------------------------------------------------------------------------------- the solver and its traces
def test_solver_traces_score_one_and_match_the_brute_force(puzzles):
    assert len(puzzles) >= 500
    assert {r["num_people"] for r in puzzles} == set(SIZES)
    for row in puzzles:
        statements = _tuples(json.loads(row["statements"]))
        # reasoning-gym's own brute force, independent of this kit's solver.
        assert KnightsKnavesDataset.find_solution(statements) == [tuple(gold(row))]
        assert reward(row, row["completion"][0]["content"]) == 1.0
        # The answer the trace states is exactly the gold one.
        trace = row["completion"][0]["content"]
        block = trace[trace.rindex(ANSWER_OPEN) + len(ANSWER_OPEN) : trace.rindex(ANSWER_CLOSE)]
        assert block == row["answer"]
        assert list(parse_roles(block, row["names"], row["roles"])) == gold(row)


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x


def test_traces_reason_from_the_statements(puzzles):
    """Traces restate every statement and contain deductions and, where propagation stalls, refuted suppositions;
    each supposition refuted at the top level is indeed false in the (unique) solution."""
    with_cases = 0
    for row in puzzles:
        statements = _tuples(json.loads(row["statements"]))
        trace = row["completion"][0]["content"]
        for name in row["names"]:
            assert f"- {name}: " in trace
        proof = prove(statements)
        cases = [b for b in proof.blocks if isinstance(b, Case)]
        with_cases += bool(cases)
        voc = Vocabulary(*row["roles"])
        for case in cases:
            name, supposed = row["names"][case.person], case.supposed
            assert supposed != gold(row)[case.person]
            assert f"Suppose {name} is {voc.a(supposed)}." in trace
            assert f"So {name} cannot be {voc.a(supposed)}: {name} is {voc.a(not supposed)}." in trace
        assert trace.count("Contradiction.") >= len(cases)
        # The check lists every person with the gold role and their statement's truth under the gold roles.
        for i, name in enumerate(row["names"]):
            truth = "true" if evaluate(statements[i], gold(row)) else "false"
            assert f'- {name} is {voc.a(gold(row)[i])}, and "' in trace and f'" is {truth}.' in trace
    assert with_cases > len(puzzles) // 2  # most puzzles need case analysis


def _random_statement(rng, n, depth=2):
    if depth == 1 or rng.random() < 0.3:
        return (rng.choice(["telling-truth", "lying"]), rng.randrange(n))
    op = rng.choice(["not", "and", "or", "->", "<=>"])
    if op == "not":
        return ("not", _random_statement(rng, n, depth - 1))
    parts = 2 if op in ("->", "<=>") else rng.choice([2, 3])
    return (op, *(_random_statement(rng, n, depth - 1) for _ in range(parts)))


def test_three_valued_rules_are_sound_against_brute_force():
    """`value` and `force` only draw conclusions that hold in every completion of the partial assignment."""
    rng = random.Random(0)
    for _ in range(400):
        n = rng.randint(2, 4)
        stmt = _random_statement(rng, n, depth=3)
        known = {j: rng.random() < 0.5 for j in rng.sample(range(n), rng.randint(0, n))}
        completions = [
            roles
            for roles in itertools.product((True, False), repeat=n)
            if all(roles[j] == v for j, v in known.items())
        ]
        v, _ = value(stmt, known)
        if v is not None:
            assert all(evaluate(stmt, roles) == v for roles in completions)
        for want in (True, False):
            satisfying = [roles for roles in completions if evaluate(stmt, roles) == want]
            forced = force(stmt, want, known)
            if forced.contradiction:
                assert not satisfying, (stmt, known, want)
            for j, role in forced.literals.items():
                assert all(roles[j] == role for roles in satisfying), (stmt, known, want, j)


def test_prove_refuses_puzzles_without_a_unique_solution():
    with pytest.raises(ValueError, match="more than one"):
        prove((("telling-truth", 1), ("telling-truth", 0)))  # both knights or both knaves
    with pytest.raises(ValueError, match="no solution"):
        prove((("telling-truth", 1), ("lying", 0)))


# ---------------------------------------------------------------------------------------- the reward
def test_a_wrong_role_for_any_one_person_scores_zero(puzzles):
    for row in puzzles[::5]:
        roles = gold(row)
        for flip in range(len(roles)):
            wrong = [r != (i == flip) for i, r in enumerate(roles)]
            text = ", ".join(phrase(name, r, row) for name, r in zip(row["names"], wrong, strict=True))
            assert reward(row, f"{ANSWER_OPEN}{text}.{ANSWER_CLOSE}") == 0.0
        right = ", ".join(phrase(name, r, row) for name, r in zip(row["names"], roles, strict=True))
        assert reward(row, f"{ANSWER_OPEN}{right}.{ANSWER_CLOSE}") == 1.0


PHRASINGS = [
    lambda pairs: (
        "<answer>" + ", ".join(f"{n} is a {'knight' if r else 'knave'}" for n, r in pairs) + "</answer>"
    ),
    lambda pairs: (
        "<answer>\n"
        + "\n".join(f"({i + 1}) {n} is a {'Knight' if r else 'Knave'}" for i, (n, r) in enumerate(pairs))
        + "\n</answer>"
    ),
    lambda pairs: (
        "So the answer is: " + "; ".join(f"{n}: {'truth-teller' if r else 'liar'}" for n, r in pairs)
    ),
    lambda pairs: (
        "<ANSWER>" + ". ".join(f"{n} is not a {'knave' if r else 'knight'}" for n, r in pairs) + "</ANSWER>"
    ),
    lambda pairs: "\\boxed{" + ", ".join(f"{n}={'knight' if r else 'knave'}" for n, r in pairs) + "}",
    lambda pairs: (
        "<answer>| name | role |\n|---|---|\n"
        + "\n".join(f"| {n} | {'knight' if r else 'knave'} |" for n, r in pairs)
        + "\n</answer>"
    ),
    lambda pairs: (
        "<answer>Knights: "
        + ", ".join(n for n, r in pairs if r)
        + ". Knaves: "
        + ", ".join(n for n, r in pairs if not r)
        + ".</answer>"
    ),
    lambda pairs: (
        "<answer>"
        + " and ".join(n for n, r in pairs if r)
        + " are knights; "
        + " and ".join(n for n, r in pairs if not r)
        + " are knaves.</answer>"
    ),
    lambda pairs: (
        "Final answer: " + ", ".join(f"{n.lower()} is a {'knight' if r else 'knave'}" for n, r in pairs)
    ),
]


def test_reordered_names_and_alternative_phrasings_score_one(puzzles):
    rng = random.Random(1)
    for row in puzzles[::7]:
        pairs = list(zip(row["names"], gold(row), strict=True))
        rng.shuffle(pairs)
        for i, render in enumerate(PHRASINGS):
            if i in (6, 7) and (all(r for _, r in pairs) or not any(r for _, r in pairs)):
                continue  # "Knights: ... Knaves: (nobody)" is not an answer anyone writes
            assert reward(row, render(pairs)) == 1.0, render(pairs)
        own_words = ", ".join(phrase(n, r, row) for n, r in pairs)
        assert reward(row, f"{ANSWER_OPEN}{own_words}{ANSWER_CLOSE}") == 1.0
        # Conversational completions, as TRL passes them.
        assert reward(row, [{"role": "assistant", "content": PHRASINGS[0](pairs)}]) == 1.0
        # The last answer block counts: a wrong first attempt, then the right one (and the other way round).
        wrong = [(n, not r) for n, r in pairs]
        assert reward(row, PHRASINGS[0](wrong) + " Wait, I made a mistake. " + PHRASINGS[0](pairs)) == 1.0
        assert reward(row, PHRASINGS[0](pairs) + " Hmm, no. " + PHRASINGS[0](wrong)) == 0.0


def test_hedged_incomplete_garbage_empty_and_truncated_completions_score_zero_quickly(puzzles):
    row = next(r for r in puzzles if r["num_people"] == 5)
    pairs = list(zip(row["names"], gold(row), strict=True))
    trace = row["completion"][0]["content"]
    # Both roles, the right one first (a parser taking the first role said would score it 1).
    hedged = "<answer>" + ", ".join(
        f"{n} is a {'knight/knave' if r else 'knave or a knight'}" for n, r in pairs
    )
    hedged += "</answer>"
    # A right block, then a last one cut off: the final answer is unfinished.
    recut = PHRASINGS[0](pairs) + f" Let me double-check. <answer>{pairs[0][0]} is a"
    missing = PHRASINGS[0](pairs[:-1])
    both = (
        PHRASINGS[0](pairs)[: -len("</answer>")]
        + f", {pairs[0][0]} is a {'knave' if pairs[0][1] else 'knight'}</answer>"
    )
    garbage = ["", "   ", "<answer></answer>", "</answer><answer>", "\x00\ufffd" * 500, "knight knave " * 2000,
               "<answer>" * 3000, "<answer>" + "knight knave " * 2000 + "</answer>", "\\boxed{", "The answer is", None, 42, [], [{"role": "assistant"}],
               "answer " + " ".join(n for n, _ in pairs)]  # fmt: skip
    cuts = [trace[:i] for i in range(0, trace.rindex(ANSWER_CLOSE) + len(ANSWER_CLOSE) - 1, 7)]
    texts = [hedged, recut, missing, both, *garbage, *cuts]
    start = time.perf_counter()
    rewards = logic_reward(texts, solution=[row["solution"]] * len(texts), names=[row["names"]] * len(texts),
                           roles=[row["roles"]] * len(texts))  # fmt: skip
    elapsed = time.perf_counter() - start
    assert rewards == [0.0] * len(texts)
    assert elapsed < 2.0, f"{len(texts)} completions took {elapsed:.2f} s"
    assert reward(row, trace) == 1.0  # the untruncated trace


def test_reward_rejects_missing_columns_and_bad_solutions_by_name(puzzles):
    row = puzzles[0]
    with pytest.raises(ValueError, match="`names`"):
        logic_reward(["x"], solution=[row["solution"]])
    with pytest.raises(ValueError, match="Row 0 .*'paladin'"):
        logic_reward(["x"], solution=[["paladin"] * len(row["names"])], names=[row["names"]])
    with pytest.raises(ValueError, match="Row 0: `solution` has"):
        logic_reward(["x"], solution=[row["solution"][:1]], names=[row["names"]])


# ---------------------------------------------------------------------------------------- the dataset and splits
def test_knights_knaves_dataset_format_and_errors():
    data = knights_knaves(6, 4, seed=7)
    assert len(data) == 6 and set(data.column_names) >= {"prompt", "completion", "solution", "names", "roles"}
    row = data[0]
    assert row["prompt"][0]["role"] == "user" and "<answer>" in row["prompt"][0]["content"]
    assert row["completion"][0]["role"] == "assistant" and len(row["solution"]) == len(row["names"]) == 4
    assert knights_knaves(6, 4, seed=7).to_list() == data.to_list()  # deterministic
    assert knights_knaves(6, 4, seed=8)["statements"] != data["statements"]
    for kwargs, field in [({"n": 0, "num_people": 3}, "`n`"), ({"n": 2, "num_people": 1}, "`num_people`"),
                          ({"n": 2, "num_people": 3, "seed": -1}, "`seed`")]:  # fmt: skip
        with pytest.raises(ValueError, match=field):
            knights_knaves(**kwargs)


def _relabel_canonical(statements) -> str:
    """The smallest JSON of the statements over all renamings of the people, "and"/"or"/"iff" parts sorted."""

    def relabel(s, perm):
        if s[0] in ("telling-truth", "lying"):
            return [s[0], perm[s[1]]]
        parts = [relabel(p, perm) for p in s[1:]]
        return [s[0], *(sorted(parts, key=json.dumps) if s[0] in ("and", "or", "<=>") else parts)]

    best = None
    for perm in itertools.permutations(range(len(statements))):
        out = [None] * len(statements)
        for i, s in enumerate(statements):
            out[perm[i]] = relabel(s, perm)
        best = min(best or json.dumps(out), json.dumps(out))
    return best


SMALL = logic_data.SplitSettings(
    train_per_size=40, eval_per_size=30, train_people=(3, 4, 5), eval_people=(2, 3, 4, 5)
)


def test_splits_are_disjoint_even_from_the_same_generator_indices(tmp_path):
    """With the same seed for both splits the training draw starts on the evaluation puzzles themselves: only the
    exclusion keeps them out."""
    same_seed = logic_data.SplitSettings(**{**SMALL.__dict__, "train_seed": 5, "eval_seed": 5})
    manifest = logic_data.write_splits(tmp_path, same_seed)
    train = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    held = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert manifest["splits"]["train"]["per_size"] == {"3": 40, "4": 40, "5": 40}
    assert manifest["splits"]["eval"]["per_size"] == {"2": 30, "3": 30, "4": 30, "5": 30}
    train_keys = {_relabel_canonical(_tuples(json.loads(r["statements"]))) for r in train}
    eval_keys = {_relabel_canonical(_tuples(json.loads(r["statements"]))) for r in held}
    assert len(train_keys) == len(train) and len(eval_keys) == len(held)  # no repeats inside a split either
    assert not train_keys & eval_keys
    logic_data.check_disjoint(train, held)
    # Without the exclusion the same draw would have repeated evaluation puzzles.
    naive = knights_knaves_rows(40, 3, seed=5)
    assert {_relabel_canonical(_tuples(json.loads(r["statements"]))) for r in naive} & eval_keys


def test_splits_load_with_datasets_and_are_written_once(tmp_path):
    from datasets import load_dataset

    logic_data.write_splits(tmp_path / "a", SMALL)
    manifest = logic_data.ensure_splits(tmp_path / "a", SMALL)  # already there: not rewritten
    assert manifest["settings"]["train_per_size"] == 40
    logic_data.write_splits(tmp_path / "b", SMALL)
    for name in ("train.jsonl", "eval.jsonl"):  # deterministic
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    splits = load_dataset("json", data_files={"train": str(tmp_path / "a" / "train.jsonl"),
                                              "test": str(tmp_path / "a" / "eval.jsonl")})  # fmt: skip
    assert len(splits["train"]) == 120 and len(splits["test"]) == 120
    subset = logic_data.load_split(tmp_path / "a", "eval", num_people=[2, 5], limit=3)
    assert subset["num_people"] == [2, 2, 2, 5, 5, 5]
    with pytest.raises(ValueError, match="other settings"):
        logic_data.ensure_splits(tmp_path / "a", logic_data.SplitSettings())
    with pytest.raises(FileNotFoundError, match="bridge_trl.logic.data"):
        logic_data.load_split(tmp_path / "missing", "train")


@pytest.mark.slow
def test_default_splits_match_the_reference(tmp_path):
    manifest = logic_data.main(["--output_dir", str(tmp_path)])
    assert manifest["splits"]["train"]["rows"] == 5000 and manifest["splits"]["eval"]["rows"] == 695
    for split in ("train", "eval"):
        assert manifest["splits"][split]["fingerprint"] == logic_data.REFERENCE_FINGERPRINTS[split]


# ---------------------------------------------------------------------------------------- evaluation
def test_scores_per_size_and_overall_through_the_shared_path(tmp_path):
    """A stand-in generator answers right exactly on the puzzles it is told to; the per-size and overall
    accuracies must be those fractions."""
    from argparse import Namespace

    from bridge_trl.evals.report import render_table
    from bridge_trl.evals.runner import evaluate_benchmarks
    from bridge_trl.logic.evaluate import add_overall, logic_benchmark, titles_for

    logic_data.write_splits(tmp_path, SMALL)
    problems = logic_data.load_split(tmp_path, "eval", limit=10).to_list()
    right = {i for i in range(len(problems)) if i % 3 == 0}
    by_prompt = {json.dumps(p["prompt"]): (i, p) for i, p in enumerate(problems)}

    class Tokenizer:
        def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
            return json.dumps(messages)

    def generate(texts, n, sampling):
        out = []
        for text in texts:
            i, p = by_prompt[text]
            roles = [r == "knight" for r in p["solution"]]
            if i not in right:
                roles[0] = not roles[0]
            out.append([PHRASINGS[0](list(zip(p["names"], roles, strict=True)))] * n)
        return out

    sizes = sorted({p["num_people"] for p in problems})
    benchmarks = [logic_benchmark(s, [p for p in problems if p["num_people"] == s]) for s in sizes]
    args = Namespace(seed=0, samples=1, temperature=None, top_p=1.0, max_new_tokens=8, name="stand-in", model="m",
                     adapter=None, pass_k=None)  # fmt: skip
    result = evaluate_benchmarks(benchmarks, args, generate=generate, tokenizer=Tokenizer())
    add_overall(result)
    for s in sizes:
        idx = [i for i, p in enumerate(problems) if p["num_people"] == s]
        assert result["scores"][f"kk_{s}ppl"] == pytest.approx(100 * len(right & set(idx)) / len(idx))
    assert result["scores"]["overall"] == pytest.approx(100 * len(right) / len(problems))
    table = render_table([result], titles_for(sizes), average_title=None)
    assert table.splitlines()[0] == "| Model | 2 people | 3 people | 4 people | 5 people | Overall |"
    assert f"| {result['scores']['overall']:.1f} |" in table


@pytest.mark.slow
def test_evaluate_cli_on_a_tiny_model(tmp_path, tokenizer):
    from bridge_trl.logic.evaluate import main
    from bridge_trl.tiny import build_tiny_model

    model_dir = tmp_path / "tiny"
    build_tiny_model(tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    logic_data.write_splits(tmp_path / "data", SMALL)
    out = tmp_path / "eval"
    result = main(["--model", str(model_dir), "--data_dir", str(tmp_path / "data"), "--limit", "2",
                   "--max_new_tokens", "4", "--backend", "hf", "--output_dir", str(out)])  # fmt: skip
    assert result["num_problems"] == 8 and set(result["scores"]) == {"kk_2ppl", "kk_3ppl", "kk_4ppl", "kk_5ppl",
                                                                     "overall"}  # fmt: skip
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
    assert "| Overall |" in (out / "results.md").read_text()
    assert json.loads((out / "results.json").read_text())["scores"] == result["scores"]


# ---------------------------------------------------------------------------------------- the training CLI
@pytest.mark.slow
def test_logic_recipe_runs_through_the_training_cli(tmp_path):
    import yaml

    from .test_cli import run_cli, write_recipe

    # Puzzles of 2-3 people: their prompts fit the tiny model's 1,024 positions (a byte-level tokenizer).
    settings = logic_data.SplitSettings(
        train_people=(3,), eval_people=(2, 3), train_per_size=8, eval_per_size=2
    )
    logic_data.write_splits(tmp_path / "data", settings)
    recipe = yaml.safe_load((ROOT / "configs/recipes/Qwen2.5-3B/logic_bridge.yaml").read_text())
    path = write_recipe(tmp_path, "bridge", **{k: recipe[k] for k in ("task", "reward_correct", "reward_incorrect")},
                        logic_data_dir=str(tmp_path / "data"), max_sft_length=1000, eval_after_training=True,
                        eval_args="--limit 1 --max_new_tokens 4 --backend hf")  # fmt: skip
    run_cli(path)
    out = tmp_path / "out"
    assert (out / "adapter" / "adapter_config.json").exists()
    scores = json.loads((out / "eval" / "results.json").read_text())["scores"]
    assert set(scores) == {"kk_2ppl", "kk_3ppl", "overall"}
    logged = (out / "README.md").read_text()
    assert "knights_knaves" in logged  # the model card names the dataset


def test_noisy_reward_wraps_the_logic_reward(puzzles):
    """The reward-noise study's wrapper flips the logic reward like any binary reward: every flip turns a 1 of
    the solver's traces into a 0, and the wrapper counts exactly those."""
    noisy_reward = pytest.importorskip("bridge_trl.noisy_reward")
    rows = puzzles[:200]
    noisy = noisy_reward.NoisyReward(logic_reward, flip_prob=0.2, seed=0)
    columns = {k: [r[k] for r in rows] for k in ("solution", "names", "roles")}
    out = noisy([r["completion"] for r in rows], **columns)
    assert set(out) <= {0.0, 1.0} and noisy.__name__ == "logic_reward"
    assert noisy.flips == out.count(0.0) and noisy.flippable == len(rows)
    assert 20 < out.count(0.0) < 60  # 40 expected
