"""bridge_trl: BRIDGE (cooperative SFT and RL by bilevel optimisation, arXiv 2509.06948) as a TRL trainer."""

from .config import BridgeConfig
from .noisy_reward import NoisyReward
from .trainer import BridgeTrainer, default_peft_config

__version__ = "0.1.0"
__all__ = ["BridgeConfig", "BridgeTrainer", "NoisyReward", "default_peft_config"]
