"""`bridge-trl`: the console command (`[project.scripts]`), one flat `main()` per subcommand.

    bridge-trl train --config recipe.yaml [--field value ...]    # bridge_trl.cli.train
    bridge-trl eval maths|logic|ood [--flag value ...]           # bridge_trl.cli.eval

`python -m bridge_trl.cli ...` is the same command (e.g. under `accelerate launch -m bridge_trl.cli train ...`).
"""

from __future__ import annotations

import sys

USAGE = """usage: bridge-trl {train,eval} ...

  train   train with BRIDGE or a baseline from a YAML recipe (`bridge-trl train --help`)
  eval    evaluate a trained policy: `bridge-trl eval maths|logic|ood --help`
"""


def main(argv: list[str] | None = None) -> None:
    """The console entry point; returns None (a console script exits with what `main` returns)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv else None
    if command == "train":
        from .train import main as train_main

        train_main(argv)
        return None
    if command == "eval":
        from .eval import main as eval_main

        eval_main(argv)
        return None
    sys.stdout.write(USAGE)
    if command not in (None, "-h", "--help"):
        sys.stderr.write(f"bridge-trl: unknown command {command!r}\n")
        raise SystemExit(2)
    return None
