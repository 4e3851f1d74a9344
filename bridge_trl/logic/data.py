"""The Knights-and-Knaves splits, Logic-RL's layout: training puzzles of 3-7 people, evaluation of 2-8 people.

    python -m bridge_trl.logic.data --output_dir data/logic

writes `train.jsonl` (1,000 puzzles per size, 3-7 people), `eval.jsonl` (100 per size, 2-8 people; all 95
that exist of 2 people) and
`manifest.json` (the settings, versions, counts and a fingerprint of each split). The splits are generated, not
shipped: the train split with its traces is ~15 MB, and it is made in about a minute, deterministically from
the fixed seeds (reasoning-gym is pinned). The evaluation puzzles are drawn first and the training draw skips
every one of them (`puzzles.puzzle_key`: the same statements, up to the order of "and"/"or" parts and, for up to
5 people, up to renaming the people), so the splits are disjoint by construction. Each split's
`fingerprint` covers the puzzles only (statements, names, role words, in order), so changing how traces are
worded keeps it; `REFERENCE_FINGERPRINTS` are those of the default splits, and a mismatch (another
reasoning-gym or numpy draws other puzzles) is logged as a warning and recorded.

Load them as any TRL dataset: `load_dataset("json", data_files={"train": ".../train.jsonl", "test":
".../eval.jsonl"})`, or `load_split(dir, "eval", num_people=5)`. `ensure_splits(dir)` writes them when absent
(the training CLI calls it on the main process first; the evaluation CLI too).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

from .puzzles import knights_knaves_rows, puzzle_key

logger = logging.getLogger(__name__)

DEFAULT_DATA_DIR = "data/logic"
SPLIT_FILES = {"train": "train.jsonl", "eval": "eval.jsonl"}
# reasoning-gym draws only 95 distinct 2-person puzzles (up to renaming; 95 in 5,000 and in 20,000 draws): a size
# is capped at the puzzles that exist rather than padded with repeats.
DISTINCT_PUZZLES = {2: 95}
MANIFEST = "manifest.json"  # written last: a folder without it holds an interrupted write


@dataclass(frozen=True)
class SplitSettings:
    """What the splits are made from; the manifest records it and `ensure_splits` compares it."""

    train_people: tuple[int, ...] = (3, 4, 5, 6, 7)
    eval_people: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8)
    train_per_size: int = 1000
    eval_per_size: int = 100
    # Far apart, so that no generator index of one split is that of the other (reasoning-gym seeds item i with
    # seed + i); disjointness itself is enforced by excluding the evaluation puzzles from the training draw.
    train_seed: int = 0
    eval_seed: int = 1_000_000

    def validate(self) -> None:
        for name in ("train_per_size", "eval_per_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be at least 1, got {getattr(self, name)}.")
        for name in ("train_people", "eval_people"):
            if not getattr(self, name):
                raise ValueError(f"`{name}` must name at least one number of people.")


# sha256 of each default split's puzzles (`fingerprint`), with reasoning-gym 0.1.25 and numpy 2.x.
REFERENCE_FINGERPRINTS = {
    "train": "59ee1c2e58dffe58858340105c48b042549abeabdde68b17589c69c1f8f9373d",
    "eval": "ab250601977d3bb480cdfc4b3e51bbf6686f6526c8145f3eb47cb5c7046764ee",
}


def fingerprint(rows: list[dict]) -> str:
    """A digest of the puzzles of a split (not of their traces)."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps([row["statements"], row["names"], row["roles"]]).encode())
    return digest.hexdigest()


def build_splits(settings: SplitSettings = SplitSettings()) -> dict[str, list[dict]]:
    """The rows of both splits: evaluation first, then training puzzles that are not among them."""
    settings.validate()
    eval_rows = []
    for people in settings.eval_people:
        count = min(settings.eval_per_size, DISTINCT_PUZZLES.get(people, settings.eval_per_size))
        eval_rows += knights_knaves_rows(count, people, settings.eval_seed)
    held_out = frozenset(puzzle_key(json.loads(r["statements"])) for r in eval_rows)
    train_rows = []
    for people in settings.train_people:
        count = min(settings.train_per_size, DISTINCT_PUZZLES.get(people, settings.train_per_size))
        train_rows += knights_knaves_rows(count, people, settings.train_seed, exclude=held_out)
    return {"train": train_rows, "eval": eval_rows}


def _versions() -> dict[str, str]:
    out = {}
    for package in ("reasoning_gym", "numpy", "bridge_trl"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = "absent"
    return out


def _settings_record(settings: SplitSettings) -> dict:
    return json.loads(json.dumps(asdict(settings)))  # tuples as lists, as they read back from JSON


def write_splits(output_dir: str | Path, settings: SplitSettings = SplitSettings()) -> dict:
    """Write both splits and the manifest into `output_dir`; returns the manifest."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    splits = build_splits(settings)
    manifest = {"settings": _settings_record(settings), "versions": _versions(), "splits": {}}
    for split, rows in splits.items():
        path = out / SPLIT_FILES[split]
        tmp = path.with_suffix(".jsonl.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
        sizes = sorted({r["num_people"] for r in rows})
        digest = fingerprint(rows)
        is_default = settings == SplitSettings()
        matches = REFERENCE_FINGERPRINTS.get(split) == digest if is_default else None
        if matches is False:
            logger.warning(
                "The %s split differs from the reference split (fingerprint %s, expected %s): another "
                "reasoning-gym or numpy draws other puzzles, so scores are not comparable with published ones.",
                split, digest[:12], REFERENCE_FINGERPRINTS.get(split, "")[:12],
            )  # fmt: skip
        manifest["splits"][split] = {
            "file": SPLIT_FILES[split],
            "rows": len(rows),
            "per_size": {str(p): sum(r["num_people"] == p for r in rows) for p in sizes},
            "fingerprint": digest,
            "matches_reference": matches,
        }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    logger.info("Wrote %s: %s", out, {s: m["rows"] for s, m in manifest["splits"].items()})
    return manifest


def ensure_splits(output_dir: str | Path, settings: SplitSettings | None = None) -> dict:
    """The manifest of the splits in `output_dir`, writing them first when absent or cut short.

    With `settings`, splits made with other settings are refused; without, any complete splits are taken as they
    are (a folder a user wrote with custom settings) and the defaults are written when there are none.
    """
    out = Path(output_dir)
    manifest_path = out / MANIFEST
    complete = manifest_path.exists() and all((out / f).exists() for f in SPLIT_FILES.values())
    if complete:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if settings is not None and manifest.get("settings") != _settings_record(settings):
            raise ValueError(
                f"{out} holds Knights-and-Knaves splits made with other settings ({manifest.get('settings')}); "
                f"use another folder or delete it."
            )
        return manifest
    return write_splits(out, settings or SplitSettings())


def load_split(data_dir: str | Path, split: str, num_people=None, limit: int | None = None):
    """A split as a `datasets.Dataset`; `num_people` (an int or several) keeps those sizes, `limit` the first
    `limit` puzzles of each size."""
    from datasets import load_dataset

    if split not in SPLIT_FILES:
        raise ValueError(f"Unknown split {split!r}; valid: {', '.join(SPLIT_FILES)}.")
    path = Path(data_dir) / SPLIT_FILES[split]
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: write the splits with `python -m bridge_trl.logic.data "
                                f"--output_dir {data_dir}`.")  # fmt: skip
    data = load_dataset("json", data_files=str(path), split="train")
    missing = {"prompt", "solution", "names", "num_people"} - set(data.column_names)
    if missing:
        raise ValueError(f"{path} is not a Knights-and-Knaves split: no column(s) {sorted(missing)}.")
    sizes = None if num_people is None else {num_people} if isinstance(num_people, int) else set(num_people)
    if sizes is not None or limit is not None:
        counts: dict[int, int] = {}
        keep = []
        for i, people in enumerate(data["num_people"]):
            if (sizes is None or people in sizes) and (limit is None or counts.get(people, 0) < limit):
                counts[people] = counts.get(people, 0) + 1
                keep.append(i)
        if sizes is not None and not keep:
            raise ValueError(f"{path} has no puzzles of {sorted(sizes)} people.")
        data = data.select(keep)
    return data


def check_disjoint(train_rows, eval_rows) -> None:
    """Raise if any training puzzle is an evaluation puzzle (by `puzzle_key`)."""
    shared = {puzzle_key(json.loads(r["statements"])) for r in train_rows}
    shared &= {puzzle_key(json.loads(r["statements"])) for r in eval_rows}
    if shared:
        raise ValueError(f"{len(shared)} puzzles are in both splits, e.g. {sorted(shared)[0]}.")


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    defaults = SplitSettings()
    p = argparse.ArgumentParser(prog="python -m bridge_trl.logic.data", description=__doc__.split("\n")[0])
    p.add_argument(
        "--output_dir", default=DEFAULT_DATA_DIR, help="where train.jsonl, eval.jsonl, manifest go"
    )
    p.add_argument("--train_people", type=int, nargs="+", default=list(defaults.train_people))
    p.add_argument("--eval_people", type=int, nargs="+", default=list(defaults.eval_people))
    p.add_argument("--train_per_size", type=int, default=defaults.train_per_size, help="puzzles per size")
    p.add_argument("--eval_per_size", type=int, default=defaults.eval_per_size, help="puzzles per size")
    p.add_argument("--train_seed", type=int, default=defaults.train_seed)
    p.add_argument("--eval_seed", type=int, default=defaults.eval_seed)
    p.add_argument("--overwrite", action="store_true", help="rewrite splits made with other settings")
    args = p.parse_args(argv)
    settings = SplitSettings(
        tuple(args.train_people), tuple(args.eval_people), args.train_per_size, args.eval_per_size,
        args.train_seed, args.eval_seed,
    )  # fmt: skip
    manifest = (
        write_splits(args.output_dir, settings)
        if args.overwrite
        else ensure_splits(args.output_dir, settings)
    )
    print(json.dumps(manifest["splits"], indent=1))  # the CLI's product; the library itself logs
    return manifest


if __name__ == "__main__":
    main()
