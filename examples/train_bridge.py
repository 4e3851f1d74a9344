"""Train with BRIDGE, or one of the paper's baselines, from a YAML recipe: a thin wrapper of `bridge-trl train`.

    accelerate launch --config_file configs/accelerate/zero3.yaml --num_processes 4 \\
        examples/train_bridge.py --config configs/recipes/Qwen2.5-3B/bridge.yaml

The command itself lives in the package (`bridge_trl/cli/train.py`) and is installed as `bridge-trl train`.
"""

from bridge_trl.cli.train import ScriptArguments, main  # noqa: F401  (ScriptArguments: recipes are parsed with it)

if __name__ == "__main__":
    main()
