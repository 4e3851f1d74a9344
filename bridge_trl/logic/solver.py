"""A Knights-and-Knaves solver that proves its answer the way a careful person does: propagation and case analysis.

A puzzle is a tuple of statements, one per person, in reasoning-gym's form: `("telling-truth", j)` ("j is a
knight"), `("lying", j)` ("j is a knave"), `("not", s)`, `("and", s1, s2, ...)`, `("or", ...)`, `("->", a, b)`,
`("<=>", a, b)`. Person i is a knight (True) exactly when statement i is true.

`solutions` is the brute-force truth (every assignment checked). `prove` writes a proof without guessing:

- **propagation**: a person whose role is known makes their statement true or false, which forces roles
  (`SpeakerStep`); a statement whose truth is settled by known roles fixes its speaker's role (`EvaluatedStep`);
- **case analysis**: when propagation stalls, suppose one person has one role and propagate until a
  contradiction (nested cases where needed, both of which must fail); the person then has the other role.

Of all the suppositions that fail, the one with the shortest refutation is written, so traces stay short. Every
step is sound by construction (the forcing rules only draw necessary conclusions); tests check each fact and
each refuted supposition against the brute force.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

Statement = tuple
Known = dict[int, bool]  # person -> True (knight) / False (knave); insertion order is the order of discovery

LITERALS = ("telling-truth", "lying")


def evaluate(stmt: Statement, roles) -> bool:
    """The truth of `stmt` under a full assignment `roles` (a sequence of bools)."""
    op = stmt[0]
    if op == "telling-truth":
        return bool(roles[stmt[1]])
    if op == "lying":
        return not roles[stmt[1]]
    if op == "not":
        return not evaluate(stmt[1], roles)
    if op == "and":
        return all(evaluate(s, roles) for s in stmt[1:])
    if op == "or":
        return any(evaluate(s, roles) for s in stmt[1:])
    if op == "->":
        return (not evaluate(stmt[1], roles)) or evaluate(stmt[2], roles)
    if op == "<=>":
        return evaluate(stmt[1], roles) == evaluate(stmt[2], roles)
    raise ValueError(f"Unknown statement operator {op!r} in {stmt!r}.")


def solutions(statements: tuple[Statement, ...]) -> list[tuple[bool, ...]]:
    """Every consistent assignment, by brute force over the 2^n of them."""
    n = len(statements)
    return [
        roles
        for roles in itertools.product((True, False), repeat=n)
        if all(evaluate(s, roles) == roles[i] for i, s in enumerate(statements))
    ]


def people_in(stmt: Statement) -> set[int]:
    if stmt[0] in LITERALS:
        return {stmt[1]}
    return set().union(*(people_in(s) for s in stmt[1:]))


# ---------------------------------------------------------------------------------------- three-valued logic
def value(stmt: Statement, known: Known) -> tuple[bool | None, frozenset[int]]:
    """The truth of `stmt` under partial roles (None if unsettled) and the people whose roles settle it."""
    op = stmt[0]
    if op in LITERALS:
        j = stmt[1]
        if j not in known:
            return None, frozenset()
        return known[j] == (op == "telling-truth"), frozenset({j})
    if op == "not":
        v, deps = value(stmt[1], known)
        return (None if v is None else not v), deps
    if op in ("and", "or"):
        decisive = op == "or"  # a true disjunct settles "or"; a false conjunct settles "and"
        vals = [value(s, known) for s in stmt[1:]]
        for v, deps in vals:
            if v is decisive:
                return decisive, deps
        if all(v is not None for v, _ in vals):
            return not decisive, frozenset().union(*(d for _, d in vals))
        return None, frozenset()
    (va, da), (vb, db) = value(stmt[1], known), value(stmt[2], known)
    if op == "->":
        if va is False:
            return True, da
        if vb is True:
            return True, db
        if va is True and vb is False:
            return False, da | db
        return None, frozenset()
    if op == "<=>":
        if va is None or vb is None:
            return None, frozenset()
        return va == vb, da | db
    raise ValueError(f"Unknown statement operator {op!r} in {stmt!r}.")


@dataclass(frozen=True)
class Forced:
    """What making a statement true/false requires: new roles (`literals`), from the known roles in `deps`; or
    `contradiction` (then `clash` names a person who would need both roles, if that is the reason)."""

    literals: dict[int, bool] = field(default_factory=dict)
    deps: frozenset[int] = frozenset()
    contradiction: bool = False
    clash: int | None = None


def _combine(parts: list[Forced]) -> Forced:
    """All of `parts` must hold at once."""
    literals: dict[int, bool] = {}
    deps: frozenset[int] = frozenset()
    for part in parts:
        if part.contradiction:
            return part
        deps |= part.deps
        for j, v in part.literals.items():
            if literals.get(j, v) != v:
                return Forced(deps=deps, contradiction=True, clash=j)
            literals[j] = v
    return Forced(literals, deps)


def force(stmt: Statement, want: bool, known: Known) -> Forced:
    """The roles that making `stmt` have truth `want` forces, given `known` (only necessary conclusions)."""
    op = stmt[0]
    if op in LITERALS:
        j, target = stmt[1], want == (op == "telling-truth")
        if j not in known:
            return Forced({j: target})
        return Forced() if known[j] == target else Forced(deps=frozenset({j}), contradiction=True)
    if op == "not":
        return force(stmt[1], not want, known)
    if op in ("and", "or"):
        if (op == "and") == want:  # every part must have the truth `want`
            return _combine([force(s, want, known) for s in stmt[1:]])
        # Some part must have the truth `want`: forced only when all others are known not to.
        vals = [(s, *value(s, known)) for s in stmt[1:]]
        if any(v is want for _, v, _ in vals):
            return Forced()
        open_parts = [s for s, v, _ in vals if v is None]
        deps = frozenset().union(*(d for _, v, d in vals if v is not None))
        if not open_parts:
            return Forced(deps=deps, contradiction=True)
        if len(open_parts) == 1:
            return _combine([Forced(deps=deps), force(open_parts[0], want, known)])
        return Forced()
    a, b = stmt[1], stmt[2]
    (va, da), (vb, db) = value(a, known), value(b, known)
    if op == "->":
        if not want:  # "if a then b" is false only when a is true and b false
            return _combine([force(a, True, known), force(b, False, known)])
        if va is False or vb is True:
            return Forced()
        if va is True:
            return _combine([Forced(deps=da), force(b, True, known)])
        if vb is False:
            return _combine([Forced(deps=db), force(a, False, known)])
        return Forced()
    if op == "<=>":
        if va is not None and vb is not None:
            return Forced() if (va == vb) == want else Forced(deps=da | db, contradiction=True)
        if va is not None:
            return _combine([Forced(deps=da), force(b, va == want, known)])
        if vb is not None:
            return _combine([Forced(deps=db), force(a, vb == want, known)])
        return Forced()
    raise ValueError(f"Unknown statement operator {op!r} in {stmt!r}.")


# ---------------------------------------------------------------------------------------- propagation
@dataclass(frozen=True)
class SpeakerStep:
    """`speaker`'s role is known, so their statement is true/false; that forces `forced` (given `deps`), or is
    impossible (`contradiction`, `clash` as in `Forced`)."""

    speaker: int
    role: bool
    forced: dict[int, bool]
    deps: frozenset[int]
    contradiction: bool = False
    clash: int | None = None


@dataclass(frozen=True)
class EvaluatedStep:
    """`speaker`'s statement has truth `truth` given the roles in `deps`, so the speaker has that role."""

    speaker: int
    truth: bool
    deps: frozenset[int]


Step = SpeakerStep | EvaluatedStep


def propagate(statements: tuple[Statement, ...], known: Known) -> list[Step]:
    """Draw conclusions into `known` (in place) until none is left or a contradiction (the last step) is hit.

    One conclusion at a time, always the earliest available, so that the written order reads naturally.
    """
    steps: list[Step] = []
    settled: set[int] = set()  # speakers whose statements can force nothing more
    while True:
        step = None
        for i in list(known):
            if i in settled:
                continue
            forced = force(statements[i], known[i], known)
            if forced.contradiction:
                steps.append(SpeakerStep(i, known[i], {}, forced.deps, True, forced.clash))
                return steps
            new = {j: v for j, v in forced.literals.items() if j not in known}
            if new:
                step = SpeakerStep(i, known[i], new, forced.deps)
                known.update(new)
                break
            if value(statements[i], known)[0] is not None:
                settled.add(i)
        if step is None:
            for i in range(len(statements)):
                if i not in known:
                    truth, deps = value(statements[i], known)
                    if truth is not None:
                        step = EvaluatedStep(i, truth, deps)
                        known[i] = truth
                        break
        if step is None:
            return steps
        steps.append(step)


# ---------------------------------------------------------------------------------------- case analysis
@dataclass(frozen=True)
class Refutation:
    """Supposing the roles that led here is impossible: `steps` end in a contradiction, or, when propagation
    stalls, both cases of `split` (a person) fail: `if_knight` and `if_knave`."""

    steps: list[Step]
    split: int | None = None
    if_knight: Refutation | None = None
    if_knave: Refutation | None = None

    @property
    def size(self) -> int:
        if self.split is None:
            return len(self.steps)
        return len(self.steps) + 1 + self.if_knight.size + self.if_knave.size


@dataclass(frozen=True)
class Case:
    """`person` is supposed to have role `supposed`; `refutation` shows that it fails, so they have the other."""

    person: int
    supposed: bool
    refutation: Refutation


@dataclass
class Proof:
    """The written solution: blocks of propagation steps (lists) and refuted suppositions (`Case`), in order, and
    the roles they establish."""

    blocks: list[list[Step] | Case]
    roles: tuple[bool, ...]


class _Refuter:
    """Shortest refutations of partial assignments, memoised on the assignment (at most 3^n of them)."""

    def __init__(self, statements: tuple[Statement, ...]):
        self.statements = statements
        self.memo: dict[frozenset, Refutation | None] = {}

    def __call__(self, known: Known) -> Refutation | None:
        """A refutation of `known`, or None when some full assignment extending it is consistent."""
        key = frozenset(known.items())
        if key not in self.memo:
            self.memo[key] = self._refute(dict(known))
        return self.memo[key]

    def _refute(self, known: Known) -> Refutation | None:
        steps = propagate(self.statements, known)
        if steps and getattr(steps[-1], "contradiction", False):
            return Refutation(steps)
        if len(known) == len(self.statements):
            return None  # every statement checked against its speaker: consistent
        best = None
        for q in range(len(self.statements)):
            if q in known:
                continue
            if_knight = self({**known, q: True})
            if if_knight is None:
                return None
            if_knave = self({**known, q: False})
            if if_knave is None:
                return None
            candidate = Refutation(steps, q, if_knight, if_knave)
            if best is None or candidate.size < best.size:
                best = candidate
        return best


def prove(statements: tuple[Statement, ...]) -> Proof:
    """A written solution of a puzzle with exactly one solution; a ValueError if it has none or several."""
    statements = tuple(statements)
    refute = _Refuter(statements)
    known: Known = {}
    blocks: list[list[Step] | Case] = []
    steps = propagate(statements, known)
    while True:
        if steps:
            if getattr(steps[-1], "contradiction", False):
                raise ValueError("The puzzle has no solution: its statements contradict each other.")
            blocks.append(steps)
        if len(known) == len(statements):
            break
        best: Case | None = None
        for person in range(len(statements)):
            if person in known:
                continue
            for supposed in (True, False):
                refutation = refute({**known, person: supposed})
                if refutation is not None and (best is None or refutation.size < best.refutation.size):
                    best = Case(person, supposed, refutation)
        if best is None:  # neither role of anyone undecided can be ruled out: several solutions
            raise ValueError("The puzzle has more than one solution.")
        blocks.append(best)
        known[best.person] = not best.supposed
        steps = propagate(statements, known)
    roles = tuple(known[i] for i in range(len(statements)))
    if any(evaluate(s, roles) != roles[i] for i, s in enumerate(statements)):  # propagation checks this too
        raise AssertionError(f"The proof's roles {roles} do not satisfy the statements.")
    return Proof(blocks, roles)
