"""Writing a solver's proof (`solver.prove`) as an SFT trace: the statements, the deductions, a check, the answer.

The trace is prose a careful person would write: the rules, each statement restated, then every conclusion with
the facts it rests on ("Given that Liam is a knave, Noah's statement ... is false, so Noah is a knave."), each
supposition that fails with its contradiction (nested cases indented), a check of every statement against the
roles found, and the answer in the fixed final format `<answer>Emma is a knight, and Liam is a knave.</answer>`.
The puzzle's own words for the two roles are used (reasoning-gym also says saint/sinner, hero/villain, ...).
"""

from __future__ import annotations

from dataclasses import dataclass

from .solver import Case, EvaluatedStep, Known, Proof, Refutation, Statement, Step, evaluate

ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
INDENT = "  "


@dataclass(frozen=True)
class Vocabulary:
    """The puzzle's words for the truthful and the lying role, e.g. ('knight', 'knave') or ('saint', 'sinner')."""

    knight: str = "knight"
    knave: str = "knave"

    def word(self, role: bool) -> str:
        return self.knight if role else self.knave

    def a(self, role: bool) -> str:
        word = self.word(role)
        return ("an " if word[0].lower() in "aeiou" else "a ") + word


def say(stmt: Statement, names: list[str], voc: Vocabulary) -> str:
    """A statement in words, parenthesising compound parts (reasoning-gym's own phrasing)."""
    op = stmt[0]

    def part(s: Statement) -> str:
        text = say(s, names, voc)
        return text if s[0] in ("telling-truth", "lying") else f"({text})"

    if op in ("telling-truth", "lying"):
        return f"{names[stmt[1]]} is {voc.a(op == 'telling-truth')}"
    if op == "not":
        inner = stmt[1]
        if inner[0] in ("telling-truth", "lying"):  # "not a knight" is said "a knave"
            return f"{names[inner[1]]} is {voc.a(inner[0] == 'lying')}"
        return f"it is not the case that {part(inner)}"
    if op in ("and", "or"):
        return f" {op} ".join(part(s) for s in stmt[1:])
    if op == "->":
        return f"if {part(stmt[1])} then {part(stmt[2])}"
    if op == "<=>":
        return f"{part(stmt[1])} if and only if {part(stmt[2])}"
    raise ValueError(f"Unknown statement operator {op!r} in {stmt!r}.")


def join_and(items: list[str]) -> str:
    if len(items) <= 2:
        return " and ".join(items)
    return ", ".join(items[:-1]) + ", and " + items[-1]


def answer_text(names: list[str], roles, voc: Vocabulary) -> str:
    """The answer in reasoning-gym's requested format: 'Emma is a knight, Liam is a knave, and Noah is a knight.'"""
    parts = [f"{name} is {voc.a(role)}" for name, role in zip(names, roles, strict=True)]
    return (", ".join(parts[:-1]) + ", and " + parts[-1] if len(parts) > 1 else parts[0]) + "."


class _Writer:
    def __init__(self, statements, names: list[str], voc: Vocabulary):
        self.statements, self.names, self.voc = statements, names, voc
        self.lines: list[str] = []

    def facts(self, people, known: Known) -> str:
        return join_and([f"{self.names[j]} is {self.voc.a(known[j])}" for j in sorted(people)])

    def quote(self, i: int) -> str:
        return f'{self.names[i]}\'s statement "{say(self.statements[i], self.names, self.voc)}"'

    def step(self, step: Step, known: Known, depth: int) -> None:
        """One conclusion; updates `known` with what it establishes."""
        name = self.names[step.speaker]
        if isinstance(step, EvaluatedStep):
            truth = "true" if step.truth else "false"
            because = f"Given that {self.facts(step.deps, known)}, " if step.deps else ""
            text = f"{because}{self.quote(step.speaker)} is {truth}, so {name} is {self.voc.a(step.truth)}."
            known[step.speaker] = step.truth
        elif step.contradiction:
            truth = "true" if step.role else "false"
            text = (
                f"{name} is {self.voc.a(step.role)}, so {self.quote(step.speaker)} would have to be {truth}."
            )
            given = f"given that {self.facts(step.deps, known)}, " if step.deps else ""
            if step.clash is not None:
                other = self.names[step.clash]
                text += (
                    f" But {given}that would make {other} both {self.voc.a(True)} and {self.voc.a(False)}."
                )
            else:
                text += f" But {given}it cannot be {truth}."
            text += " Contradiction."
        else:
            truth = "true" if step.role else "false"
            text = f"{name} is {self.voc.a(step.role)}, so {self.quote(step.speaker)} is {truth}."
            new = dict(step.forced)
            merged = {**known, **new}
            if step.deps:
                text += f" Given that {self.facts(step.deps, known)}, this means {self.facts(new, merged)}."
            else:
                text += f" So {self.facts(new, merged)}."
            known.update(new)
        self.lines.append(INDENT * depth + text)

    def steps(self, steps: list[Step], known: Known, depth: int) -> None:
        for step in steps:
            self.step(step, known, depth)

    def refutation(self, refutation: Refutation, known: Known, depth: int) -> None:
        self.steps(refutation.steps, known, depth)
        if refutation.split is None:
            return
        q = self.names[refutation.split]
        self.lines.append(INDENT * depth + f"Nothing more follows directly, so consider both roles for {q}.")
        for role, branch in ((True, refutation.if_knight), (False, refutation.if_knave)):
            self.lines.append(INDENT * depth + f"If {q} is {self.voc.a(role)}:")
            self.refutation(branch, {**known, refutation.split: role}, depth + 1)
        self.lines.append(INDENT * depth + f"Both roles for {q} lead to a contradiction.")

    def case(self, case: Case, known: Known) -> None:
        name, supposed = self.names[case.person], case.supposed
        self.lines.append(f"Suppose {name} is {self.voc.a(supposed)}.")
        self.refutation(case.refutation, {**known, case.person: supposed}, 1)
        self.lines.append(
            f"So {name} cannot be {self.voc.a(supposed)}: {name} is {self.voc.a(not supposed)}."
        )
        known[case.person] = not supposed


def write_trace(statements: tuple[Statement, ...], names: list[str], voc: Vocabulary, proof: Proof) -> str:
    """The SFT completion for a puzzle: reasoning from the statements, a check, then the final answer."""
    w = _Writer(statements, names, voc)
    w.lines.append(
        f"{voc.a(True).capitalize()} always tells the truth and {voc.a(False)} always lies, so each person is "
        f"{voc.a(True)} exactly when their statement is true."
    )
    w.lines.append("")
    w.lines.append("The statements:")
    for i, name in enumerate(names):
        text = say(statements[i], names, voc)
        w.lines.append(f'- {name}: "{text[0].upper() + text[1:]}."')
    w.lines.append("")
    known: Known = {}
    for block in proof.blocks:
        if isinstance(block, Case):
            w.case(block, known)
        else:
            w.steps(block, known, 0)
    w.lines.append("")
    w.lines.append("Check every statement against these roles:")
    for i, name in enumerate(names):
        truth = evaluate(statements[i], proof.roles)
        w.lines.append(
            f'- {name} is {voc.a(proof.roles[i])}, and "{say(statements[i], names, voc)}" is '
            f"{'true' if truth else 'false'}."
        )
    w.lines.append("")
    w.lines.append(f"{ANSWER_OPEN}{answer_text(names, proof.roles, voc)}{ANSWER_CLOSE}")
    return "\n".join(w.lines)
