"""The logical-reasoning kit: Knights-and-Knaves puzzles with solver-written traces, the binary reward, the splits
(`bridge_trl.logic.data`, also a CLI) and their evaluation (`python -m bridge_trl.logic.evaluate`).

Puzzles come from reasoning-gym (the optional extra `logic`); the solver, traces and reward are this kit's own.
The trainer core never imports this package. The CLI modules are not imported here, so that `python -m` runs them
cleanly.
"""

from .puzzles import knights_knaves
from .rewards import LogicReward, logic_reward, parse_roles
from .solver import prove, solutions

__all__ = ["LogicReward", "knights_knaves", "logic_reward", "parse_roles", "prove", "solutions"]
