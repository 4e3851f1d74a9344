r"""The Knights-and-Knaves reward: 1 when the final answer gives every person the right role, else 0.

`logic_reward(completions, solution, names, roles=None, **kwargs)` is a TRL reward function: `completions` are
strings or conversational message lists; `solution`, `names` and `roles` are the dataset's columns (one role per
person in order, "knight" = truthful; the names; the puzzle's two role words, e.g. ["saint", "sinner"]).

Which text is the answer: the last closed `<answer>...</answer>` block (an `<answer>` left open after it means the
completion was cut off: 0); failing any, the last `\boxed{...}`; failing that, what follows the last word
"answer". Inside it, each person must get exactly one role, in any order and in the usual phrasings: "Emma is a
knight", "Emma: knave", "(1) Emma is a truth-teller", "Emma is not a knave", "Emma and Liam are knights",
"Knights: Emma, Liam. Knaves: Noah." The puzzle's own role words count as well as knight/knave/truth-teller/liar.
A person given two roles ("Emma is a knight/knave"), or left out, scores 0, so hedging earns nothing. Anything
unparseable scores 0 without raising.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

TRUTHFUL_WORDS = ("knight", "truth-teller", "truth teller", "truthteller")
LYING_WORDS = ("knave", "liar")
_NEGATION = r"\bnot\b|n['\u2019]t\b|\bnever\b"
_TAG = re.compile(r"<(/?)answer>", re.IGNORECASE)
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_ANSWER_WORD = re.compile(r"\banswer\b", re.IGNORECASE)


def completion_text(completion) -> str | None:
    """The text of a completion: a string, or the last assistant message of a conversational completion (its
    content a string or a list of text blocks). None for anything else."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion:
        messages = [m for m in completion if isinstance(m, dict)]
        assistant = [m for m in messages if m.get("role", "assistant") == "assistant"] or messages
        if not assistant:
            return None
        content = assistant[-1].get("content")
        if isinstance(content, list):  # content blocks: [{"type": "text", "text": ...}]
            content = "".join(b.get("text", "") for b in content if isinstance(b, dict))
        return content if isinstance(content, str) else None
    return None


def answer_block(text: str) -> str | None:
    """The part of `text` that holds the final answer (see the module docstring), or None."""
    tags = list(_TAG.finditer(text))
    if tags:
        if not tags[-1].group(1):  # the last tag opens a block that never closes: truncated
            return None
        close = tags[-1]
        opens = [t for t in tags[:-1] if not t.group(1)]
        return text[opens[-1].end() : close.start()] if opens else None
    boxed = _BOXED.findall(text)
    if boxed:
        return boxed[-1]
    words = list(_ANSWER_WORD.finditer(text))
    return text[words[-1].end() :] if words else None


def _role_pattern(words: set[str], plural_group: str) -> str:
    """Any of `words` (a space or hyphen inside one may be either, or absent), with a plural ending captured."""
    alternatives = sorted((re.escape(w).replace(r"\ ", r"[\s-]?").replace(r"\-", r"[\s-]?") for w in words),
                          key=len, reverse=True)  # fmt: skip
    return r"\b(?:" + "|".join(alternatives) + rf")(?P<{plural_group}>e?s)?\b"


def parse_roles(
    block: str, names: Sequence[str], roles: Sequence[str] | None = None
) -> tuple[bool, ...] | None:
    """Each person's role (True: the truthful one) as stated in `block`, or None if anyone is missing or given
    two roles."""
    truthful = set(TRUTHFUL_WORDS) | ({roles[0].lower()} if roles else set())
    lying = set(LYING_WORDS) | ({roles[1].lower()} if roles else set())
    index = {name.lower(): i for i, name in enumerate(names)}
    pattern = re.compile(
        "|".join(
            [
                r"(?P<name>\b(?:" + "|".join(sorted(map(re.escape, index), key=len, reverse=True)) + r")\b)",
                r"(?P<knight>" + _role_pattern(truthful, "kp") + ")",
                r"(?P<knave>" + _role_pattern(lying, "np") + ")",
                r"(?P<neg>" + _NEGATION + ")",
            ]
        ),
        re.IGNORECASE,
    )
    tokens = []  # ("name", person) | ("role", truthful?, plural?) | ("neg",)
    for m in pattern.finditer(block):
        if m.group("name"):
            tokens.append(("name", index[m.group("name").lower()]))
        elif m.group("knight"):
            tokens.append(("role", True, bool(m.group("kp"))))
        elif m.group("knave"):
            tokens.append(("role", False, bool(m.group("np"))))
        else:
            tokens.append(("neg",))
    significant = [t for t in tokens if t[0] != "neg"]
    if not significant:
        return None
    found: dict[int, bool] = {}

    def assign(person: int, role: bool) -> bool:
        """Record a role; False when the person already has the other one."""
        return found.setdefault(person, role) == role

    if significant[0][0] == "role":  # "Knights: Emma, Liam. Knaves: Noah."
        current = None
        for token in significant:
            if token[0] == "role":
                current = token[1]
            elif not assign(token[1], current):
                return None
    else:  # "Emma is a knight, Liam and Noah are knaves": each group of names, then the roles said of it
        group: list[int] = []
        said: list[tuple[bool, bool]] = []  # (role, plural) in the current segment
        negate = False

        def close() -> bool:
            if not group or not said:
                return True
            if len({role for role, _ in said}) > 1:  # "a knight/knave", "a knight or a knave"
                return False
            role, plural = said[0]
            return all(assign(p, role) for p in (group if plural else group[-1:]))

        for token in tokens:
            if token[0] == "name":
                if said:  # a new segment starts
                    if not close():
                        return None
                    group, said = [], []
                group.append(token[1])
                negate = False
            elif token[0] == "neg":
                negate = bool(group)
            elif group:
                said.append((token[1] != negate, token[2]))
                negate = False
        if not close():
            return None
    if len(found) != len(names):
        return None
    return tuple(found[i] for i in range(len(names)))


def _solution_roles(solution: Sequence, roles: Sequence[str] | None, row: int) -> tuple[bool, ...]:
    truthful = {"knight", "true", *([roles[0].lower()] if roles else [])}
    lying = {"knave", "false", *([roles[1].lower()] if roles else [])}
    out = []
    for role in solution:
        key = str(role).lower()
        if key not in truthful | lying:
            raise ValueError(
                f"Row {row} of the reward's `solution` column: role {role!r} is neither a knight nor a knave "
                f"(expected 'knight'/'knave', booleans, or the row's `roles` {list(roles or [])})."
            )
        out.append(key in truthful)
    return tuple(out)


class LogicReward:
    """A TRL reward function for Knights and Knaves; `correct`/`incorrect` are the two reward values (1/0)."""

    def __init__(self, correct: float = 1.0, incorrect: float = 0.0, name: str = "logic_reward"):
        self.correct, self.incorrect = float(correct), float(incorrect)
        self.__name__ = name

    def __repr__(self) -> str:
        return f"LogicReward(name={self.__name__!r}, correct={self.correct}, incorrect={self.incorrect})"

    def __call__(self, completions: list, solution: list | None = None, names: list | None = None,
                 roles: list | None = None, **kwargs) -> list[float]:  # fmt: skip
        for column, values in (("solution", solution), ("names", names)):
            if values is None or len(values) != len(completions):
                raise ValueError(
                    f"`{self.__name__}` needs the dataset column `{column}` (one entry per completion; got "
                    f"{'none' if values is None else len(values)} for {len(completions)} completions)."
                )
        rewards = []
        for row, completion in enumerate(completions):
            row_roles = roles[row] if roles is not None else None
            gold = _solution_roles(solution[row], row_roles, row)
            if len(gold) != len(names[row]):
                raise ValueError(
                    f"Row {row}: `solution` has {len(gold)} roles but `names` has {len(names[row])} people."
                )
            text = completion_text(completion)
            block = answer_block(text) if text else None
            parsed = parse_roles(block, names[row], row_roles) if block else None
            rewards.append(self.correct if parsed == gold else self.incorrect)
        return rewards


logic_reward = LogicReward()
