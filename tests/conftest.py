"""Shared fixtures: a tiny random Qwen2 model, a byte-level tokenizer and small RL/SFT datasets. No downloads."""

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
from datasets import Dataset  # noqa: E402

from bridge_trl.tiny import build_tiny_model, build_tokenizer  # noqa: E402

# The offline benchmark and training data (`../shared/data`, never committed; `BRIDGE_SHARED_DATA` moves it).
SHARED_DATA = Path(
    os.environ.get("BRIDGE_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data")
)
ON_CI = os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def needs_shared_data(*parts: str):
    """Skip a test whose data (`SHARED_DATA / parts`) is absent, except under CI=true, where the test runs and fails
    at the missing path: a CI job must not pass by skipping what it is there to check."""
    path = SHARED_DATA.joinpath(*parts)
    return pytest.mark.skipif(not path.exists() and not ON_CI, reason=f"shared data absent ({path})")


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture
def make_model(tokenizer):
    def make(seed: int = 0, **kwargs):
        return build_tiny_model(tokenizer, seed=seed, **kwargs)

    return make


def toy_reward(completions, **kwargs):
    """A deterministic reward that varies across random completions, so GRPO advantages are non-zero."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [float(sum(map(ord, t)) % 7) / 6.0 for t in texts]


@pytest.fixture
def rl_dataset():
    return Dataset.from_dict(
        {"prompt": [f"{i}+{i + 1}=" for i in range(32)], "answer": [str(2 * i + 1) for i in range(32)]}
    )


@pytest.fixture
def sft_dataset():
    return Dataset.from_dict(
        {
            "prompt": [f"{i}+{i + 1}=" for i in range(6)],
            "completion": [f"{i}+{i + 1}={2 * i + 1}. \\boxed{{{2 * i + 1}}}"[: 8 + i] for i in range(6)],
        }
    )


def pytest_sessionfinish(session, exitstatus):
    """`make test-vllm` under CI=true: a skipped test fails the run (a CI job must not pass by skipping its engine)."""
    if not ON_CI or session.config.option.markexpr != "vllm":
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if skipped:
        reporter.write_line(f"CI=true: {len(skipped)} vLLM test(s) skipped; failing the run.", red=True)
        session.exitstatus = 1
