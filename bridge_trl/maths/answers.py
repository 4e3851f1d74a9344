r"""Answer normalisation: gold answers as math-verify reads them, final answers out of model text.

Standard library only: the worker pool (`pool.py`) verifies the strings these functions produce.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal
from typing import Any

_INTEGER = re.compile(r"[+-]?\d+")
_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")
# A `$...$`, `$$...$$`, `\(...\)` or `\[...\]` region; `\$` (an escaped dollar sign) is not a delimiter.
_MATH_REGION = re.compile(r"(?<!\\)(\$\$?)(.+?)(?<!\\)\1|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.S)
# What may separate the regions of a list-like gold such as `$69$,$84$` or `$1$ and $2$`.
_LIST_SEPARATOR = re.compile(r"(?:\s|,|;|\band\b|\bor\b)*", re.I)


def last_boxed(text: str) -> str | None:
    r"""The content of the last balanced `\boxed{...}` (or `\fbox{...}`) in `text`; None if there is none."""
    for m in reversed(list(_BOX.finditer(text))[-8:]):  # an unbalanced last box falls back to the one before
        depth = 1
        for j in range(m.end(), len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                return text[m.end() : j].strip()
    return None


def _math_only_content(text: str) -> str | None:
    """The contents of the math regions of `text`, joined by ', ', if nothing but separators lies between them."""
    parts, pos = [], 0
    for m in _MATH_REGION.finditer(text):
        if not _LIST_SEPARATOR.fullmatch(text[pos : m.start()]):
            return None
        parts.append(next(g for g in m.groups()[1:] if g is not None).strip())
        pos = m.end()
    if not parts or not _LIST_SEPARATOR.fullmatch(text[pos:]):
        return None
    return ", ".join(parts)


def _gold_content(answer: Any) -> str | None:
    """The gold as bare LaTeX to put in a box, or None when it must be parsed as written (prose, boxes)."""
    if isinstance(answer, bool) or answer is None:
        return ""
    if isinstance(answer, int):
        return str(answer)
    if isinstance(answer, float):
        if not math.isfinite(answer):
            return str(answer)
        # 27.0 -> "27", 0.1 -> "0.1", 1e-05 -> "0.00001": plain decimals the LaTeX parser reads exactly.
        return str(int(answer)) if answer.is_integer() else format(Decimal(repr(answer)).normalize(), "f")
    if isinstance(answer, (list, tuple)):  # OlympiadBench: a list of `$`-wrapped answers
        parts = [_gold_content(a) for a in answer]
        return ", ".join(p if p is not None else str(a).strip() for p, a in zip(parts, answer, strict=True))
    text = str(answer).strip()
    if _INTEGER.fullmatch(text):  # AIME: "033" -> "33"
        return str(int(text))
    if "\\boxed" in text or "\\fbox" in text:
        return None
    if "$" in text.replace("\\$", "") or "\\(" in text or "\\[" in text:
        return _math_only_content(text)
    return text


def answer_text(answer: Any) -> str:
    """A gold answer as a plain string, for a dataset's `answer` column (AMC23's 27.0 -> "27", "$x$" -> "x")."""
    content = _gold_content(answer)
    return str(answer).strip() if content is None else content


def normalize_gold(answer: Any) -> str:
    r"""The gold answer as text for math-verify: bare answers wrapped as `\boxed{...}`.

    Raw golds parse wrongly surprisingly often (about 20% of MATH500's), because math-verify then hunts
    for the last expression in them. Ints and floats become integers where they are integral (AMC23's
    27.0 -> 27), zero-padded integers lose their padding (AIME's "033"), lists are joined with commas,
    and golds made only of `$...$` regions (OlympiadBench's `$69$,$84$`) are unwrapped and boxed. Golds
    that already hold `\boxed` or mix prose with math are passed as written.
    """
    content = _gold_content(answer)
    if content is None:
        return str(answer).strip()
    return f"\\boxed{{{content}}}" if content else ""


def completion_text(completion: Any) -> str:
    """The text of a completion: a string, or TRL's conversational `[{"role": ..., "content": ...}]`."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return completion_text(completion.get("content", ""))
    if isinstance(completion, (list, tuple)):
        return "".join(
            completion_text(m) for m in completion if not isinstance(m, dict) or m.get("role") != "user"
        )
    return "" if completion is None else str(completion)


def clip_completion(text: str, max_chars: int) -> str:
    r"""Keep long texts bounded: the window that holds the last `\boxed`, else the tail (where answers are)."""
    if len(text) <= max_chars:
        return text
    box = text.rfind("\\boxed")
    if box >= 0:
        start = max(0, min(box - max_chars // 4, len(text) - max_chars))
        return text[start : start + max_chars]
    return text[-max_chars:]
