"""`python -m bridge_trl.cli` (and `accelerate launch -m bridge_trl.cli train ...`)."""

from . import main

main()
