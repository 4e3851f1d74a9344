"""The training command's parser: TRL's `TrlParser`, with BRIDGE's fields listed first in `--help`.

A `TrlParser` over (script arguments, `BridgeConfig`, `ModelConfig`) lists GRPOConfig's and TrainingArguments'
~300 fields before BRIDGE's own. Here `--help` shows, in order: the data and reward fields, BRIDGE's fields
(those `BridgeConfig` adds), the model and adapter fields, and then everything `BridgeConfig` inherits. Parsing,
YAML recipes (`--config`) and `env:` blocks are TrlParser's, unchanged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import get_type_hints

from trl import GRPOConfig, ModelConfig, TrlParser

from ..config import BridgeConfig
from ..peer_config import PeerMethodsConfig

USAGE = "bridge-trl train [-h] [--config RECIPE.yaml] [--FIELD VALUE ...]"
DESCRIPTION = (
    "Train with BRIDGE (arXiv 2509.06948) or a baseline, TRL-style. --config RECIPE.yaml reads any field below "
    "from a YAML recipe (TrlParser's `--config`, with its `env:` block); flags on the command line override it."
)


@dataclass
class BridgeModelConfig(ModelConfig):
    """TRL's `ModelConfig`, with the paper's adapter as the LoRA defaults and `use_peft` unset by default."""

    _argument_group_name = "model and adapter (TRL's ModelConfig)"

    use_peft: bool | None = field(
        default=None,
        metadata={
            "help": "Attach a LoRA adapter built from the `lora_*` fields. Unset: method 'bridge' gets one (its "
            "adapter w) and the baselines none; false: no adapter, which method 'bridge' refuses (it needs w)."
        },
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (the paper: 16)."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (the paper: 16)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout (the paper: 0)."})
    lora_target_modules: list[str] | None = field(
        default_factory=lambda: ["all-linear"],
        metadata={"help": "LoRA target modules (the paper: every linear layer, 'all-linear')."},
    )


class BridgeParser(TrlParser):
    """`TrlParser` whose help lists `BridgeConfig`'s own fields before the ones it inherits from `GRPOConfig`."""

    def __init__(self, dataclass_types, **kwargs):
        self._inherited_group = None
        super().__init__(dataclass_types, **kwargs)
        if self._inherited_group is not None:  # argparse prints groups in creation order: move it last
            self._action_groups.remove(self._inherited_group)
            self._action_groups.append(self._inherited_group)

    def _add_dataclass_arguments(self, dtype):
        if dtype is not BridgeConfig:
            return super()._add_dataclass_arguments(dtype)
        inherited = {f.name for f in dataclasses.fields(GRPOConfig)}
        peers = {f.name for f in dataclasses.fields(PeerMethodsConfig)}
        bridge = self.add_argument_group(
            "BRIDGE (BridgeConfig's own fields; `method` picks BRIDGE or a baseline)"
        )
        peer = self.add_argument_group("peer methods (chord, luffy, relift, hpt: used only by that `method`)")
        self._inherited_group = self.add_argument_group(
            "training (GRPOConfig and TrainingArguments, inherited by BridgeConfig)"
        )
        hints = get_type_hints(dtype)
        fields = [f for f in dataclasses.fields(dtype) if f.init]
        # BRIDGE's own fields first, then the peers' (a mixin whose fields precede them in the dataclass)
        for f in sorted(fields, key=lambda f: f.name in peers):
            f.type = hints[f.name]
            group = self._inherited_group if f.name in inherited else peer if f.name in peers else bridge
            self._parse_dataclass_field(group, f)


def make_parser(script_arguments) -> BridgeParser:
    parser = BridgeParser((script_arguments, BridgeConfig, BridgeModelConfig), prog="bridge-trl train", usage=USAGE,
                          description=DESCRIPTION)  # fmt: skip
    for action in parser._actions:  # a bare `--use_peft` means true, as for TRL's (non-optional) bool flags
        if action.dest == "use_peft":
            action.nargs, action.const = "?", True
    return parser
