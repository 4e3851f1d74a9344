"""bridge_trl: BRIDGE (cooperative SFT and RL by bilevel optimisation, arXiv 2509.06948) as a TRL trainer."""

from .checks import default_peft_config
from .config import BridgeConfig
from .noisy_reward import NoisyReward
from .trainer import BridgeTrainer

__version__ = "0.1.0"
__all__ = ["BridgeConfig", "BridgeTrainer", "NoisyReward", "default_peft_config"]
