"""HPT (`method: hpt`, arXiv 2509.04419), checked on the tiny model against direct computations."""

import pytest
import torch
from datasets import Dataset

from bridge_trl import BridgeTrainer
from bridge_trl.hpt import DROPPED_ROW, GRPO_ROW, HPT_KEY, TRACE_ROW, row_roles, switch_groups

from .conftest import toy_reward
from .helpers import ROLLOUTS_SCRIPT_HEAD, assert_dicts_close, make_config

SGD = dict(optim="sgd", weight_decay=0.0, max_grad_norm=0.0, lr_scheduler_type="constant", beta=0.0)
# The reference's script (`grpo_use_std=False`, `loss_remove_token_mean=True`, `entropy_coeff`; a large
# coefficient here, so that a bonus over the GRPO tokens only would fail) and TRL's default token mean.
RECIPES = {"reference": dict(loss_type="dr_grpo", scale_rewards="none", entropy_coef=0.05),
           "dapo": dict(loss_type="dapo")}  # fmt: skip
MAX_LEN = 6  # max_completion_length of the tests


def two_prompts():
    """Two RL prompts: every step's batch (8 rows, G = 4) holds one group of each."""
    return Dataset.from_dict({"prompt": ["0+1=", "1+2="], "answer": ["1", "3"]})


def traces_for(rl):
    return Dataset.from_dict({"prompt": list(rl["prompt"]), "completion": [f"{a}." for a in rl["answer"]]})


def run(tmp_path, make_model, tokenizer, reward, rl, sft, **overrides):
    """One trainer run; returns the trainer and the batches its loss saw."""
    args = make_config(tmp_path, **{**SGD, "learning_rate": 0.1, **overrides})
    trainer = BridgeTrainer(make_model(), reward, args=args, train_dataset=rl, sft_dataset=sft,
                            processing_class=tokenizer)  # fmt: skip
    captured, compute = [], trainer._compute_loss
    trainer._compute_loss = lambda model, inputs: captured.append(dict(inputs)) or compute(model, inputs)
    trainer.train()
    return trainer, captured


def direct_theta(make_model, inputs, lr, sft_coef, loss_type, entropy_coef=0.0):
    """θ¹ = θ⁰ − α ∇ [L_GRPO(GRPO rows) + c (1/N_sft) Σ_trace −log π − e H̄(GRPO ∪ trace tokens)], fp64, at
    π_old = π_θ⁰ (ratio 1, unclipped), L_GRPO's sum over (rows × max length) ('dr_grpo') or its tokens ('dapo')."""
    model = make_model().double()
    theta0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    cmask = inputs["completion_mask"].double()
    roles = inputs[HPT_KEY]
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    t = cmask.size(1)
    logits = model(input_ids=ids, attention_mask=torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
                   ).logits[:, -t - 1 : -1]  # fmt: skip
    logps = torch.log_softmax(logits, -1).gather(-1, inputs["completion_ids"].unsqueeze(-1)).squeeze(-1)
    grpo = cmask * (roles == GRPO_ROW)[:, None]
    trace = cmask * (roles == TRACE_ROW)[:, None]
    pg = -inputs["advantages"].double()[:, None] * torch.exp(logps - logps.detach())
    norm = cmask.size(0) * MAX_LEN if loss_type == "dr_grpo" else grpo.sum().clamp(min=1)
    loss = (pg * grpo).sum() / norm + sft_coef * (-logps * trace).sum() / trace.sum()
    if entropy_coef:
        logsoft = torch.log_softmax(logits, -1)
        entropy, every = -(logsoft.exp() * logsoft).sum(-1), grpo + trace
        loss = loss - entropy_coef * (entropy * every).sum() / every.sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    grads["lm_head.weight"] = grads["model.embed_tokens.weight"]  # tied embeddings
    return {k: theta0[k] - lr * grads[k] for k in theta0}


def trace_ids(tokenizer, answer):
    return tokenizer(f"{answer}.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def test_switch_rule_and_rows():
    """Gate g: a group with ≤ g correct rollouts (reward ≥ threshold; NaN never is) switches if it has a trace."""
    nan = float("nan")
    rewards = torch.tensor([0, 0, 0, 0,  1, 0, 0, 0,  1, 1, 0, nan,  0, 0, 0, 0.])  # fmt: skip
    traced = torch.tensor([True] * 12 + [False] * 4)
    switched, gated = switch_groups(rewards, traced, 4, 0, 1.0)
    assert switched.tolist() == [True, False, False, False] and gated.tolist() == [True, False, False, True]
    switched, _ = switch_groups(rewards, traced, 4, 1, 1.0)  # exactly one correct now switches, two do not
    assert switched.tolist() == [True, True, False, False]
    switched, _ = switch_groups(rewards, traced, 4, 0, 0.5)
    assert switched.tolist() == [True, False, False, False]
    # Process 1 of 2 holds global rows 6..11: slot 0 of a switched group is its trace, the rest dropped.
    roles = row_roles(torch.tensor([False, True, True]), offset=6, rows=6, num_generations=4)
    assert roles.tolist() == [DROPPED_ROW, DROPPED_ROW, TRACE_ROW, DROPPED_ROW, DROPPED_ROW, DROPPED_ROW]
    assert row_roles(torch.tensor([False, True]), 0, 4, 4).tolist() == [GRPO_ROW] * 4


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_no_correct_rollout_is_an_sft_step(tmp_path, make_model, tokenizer, recipe):
    """No rollout earns the reward: every prompt switches, and the step is c × an SFT step on the prompts' traces
    (token-mean NLL of trace + EOS under the rendered prompt), computed here from the texts alone."""
    rl, coef, kw = two_prompts(), 0.5, RECIPES[recipe]
    trainer, (inputs,) = run(tmp_path, make_model, tokenizer, lambda completions, **k: [0.0] * len(completions),
                             rl, traces_for(rl), hpt_sft_coef=coef, method="hpt", **kw)  # fmt: skip
    assert (inputs[HPT_KEY] == TRACE_ROW).sum() == 2 and (inputs[HPT_KEY] == DROPPED_ROW).sum() == 6
    model = make_model().double()
    theta0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    nll, tokens = 0.0, 0
    for prompt, answer in zip(rl["prompt"], rl["answer"], strict=True):
        p, c = tokenizer(prompt, add_special_tokens=False)["input_ids"], trace_ids(tokenizer, answer)
        logits = model(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1 : -1]
        nll = nll - torch.log_softmax(logits, -1).gather(-1, torch.tensor(c)[:, None]).sum()
        tokens += len(c)
    (coef * nll / tokens).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    grads["lm_head.weight"] = grads["model.embed_tokens.weight"]
    expected = {k: theta0[k] - 0.1 * grads[k] for k in theta0}
    if "entropy_coef" in kw:  # the reference's entropy bonus covers the trace tokens too
        expected = direct_theta(make_model, inputs, 0.1, coef, kw["loss_type"], kw["entropy_coef"])
    assert_dicts_close(trainer.get_base_state_dict(), expected, atol=1e-6, rtol=1e-4)
    log = trainer.state.log_history[0]
    assert log["hpt/sft_prompt_fraction"] == 1.0 and log["bridge/rl_samples"] == 0
    assert log["bridge/sft_samples"] == 2 and log["bridge/sft_tokens"] == 6


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_every_rollout_correct_is_a_grpo_step(tmp_path, make_model, tokenizer, rl_dataset, recipe):
    """Every rollout earns the reward (threshold 0 under the toy reward, whose values still differ): no prompt
    switches, and two steps are method `rl`'s exactly (same rollouts, same loss_type)."""
    kw = dict(RECIPES[recipe], max_steps=2)
    hpt, _ = run(tmp_path / "h", make_model, tokenizer, toy_reward, rl_dataset, traces_for(rl_dataset),
                 method="hpt", hpt_correct_threshold=0.0, **kw)  # fmt: skip
    rl, _ = run(tmp_path / "r", make_model, tokenizer, toy_reward, rl_dataset, None, method="rl", **kw)
    assert [h["hpt/sft_prompt_fraction"] for h in hpt.state.log_history if "loss" in h] == [0.0, 0.0]
    assert_dicts_close(hpt.get_base_state_dict(), rl.get_base_state_dict(), atol=1e-7, rtol=1e-6)
    assert hpt.consumed == rl.consumed


def split_reward(completions, answer, **kwargs):
    """Prompt '0+1=': every rollout correct (1 + a varying toy reward); prompt '1+2=': none (below 1)."""
    toy = toy_reward(completions)
    return [1.0 + t if a == "1" else 0.5 * t for t, a in zip(toy, answer, strict=True)]


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_mixed_batch_is_the_sum_by_hand(tmp_path, make_model, tokenizer, recipe):
    """One group GRPO, one switched: the rows, advantages, θ¹ and consumption against a direct computation."""
    rl, coef, kw = two_prompts(), 0.7, RECIPES[recipe]
    trainer, (inputs,) = run(tmp_path, make_model, tokenizer, split_reward, rl, traces_for(rl), method="hpt",
                             hpt_sft_coef=coef, **kw)  # fmt: skip
    roles, cmask = inputs[HPT_KEY], inputs["completion_mask"]
    prompts = tokenizer.batch_decode(inputs["prompt_ids"], skip_special_tokens=True)
    grpo_rows = [i for i, p in enumerate(prompts) if p == "0+1="]
    other = [i for i, p in enumerate(prompts) if p == "1+2="]
    assert roles[grpo_rows].tolist() == [GRPO_ROW] * 4
    assert sorted(roles[other].tolist()) == [TRACE_ROW] + [DROPPED_ROW] * 3
    (t,) = [i for i in other if roles[i] == TRACE_ROW]
    assert inputs["completion_ids"][t][cmask[t].bool()].tolist() == trace_ids(tokenizer, "3")
    assert cmask[[i for i in other if i != t]].sum() == 0
    # GRPO advantages over the GRPO group: r − mean (scale_rewards="none") or / (std + 1e-4).
    texts = [tokenizer.decode(inputs["completion_ids"][i][cmask[i].bool()], skip_special_tokens=True)
             for i in grpo_rows]  # fmt: skip
    r = torch.tensor(split_reward(texts, ["1"] * 4), dtype=torch.float64)
    adv = (r - r.mean()) / (1.0 if kw.get("scale_rewards") == "none" else r.std() + 1e-4)
    torch.testing.assert_close(inputs["advantages"][grpo_rows].double(), adv, atol=1e-6, rtol=1e-5)

    expected = direct_theta(make_model, inputs, 0.1, coef, kw["loss_type"], kw.get("entropy_coef", 0.0))
    assert_dicts_close(trainer.get_base_state_dict(), expected, atol=1e-6, rtol=1e-4)
    log = trainer.state.log_history[0]
    assert log["hpt/sft_prompt_fraction"] == 0.5 and log["hpt/trace_length"] == 3
    assert log["bridge/sft_samples"] == 1 and log["bridge/sft_tokens"] == 3
    assert log["bridge/rl_samples"] == 4 and log["bridge/rl_tokens"] == cmask[grpo_rows].sum().item()


@pytest.mark.parametrize("gate, fraction", [(0, 0.0), (1, 1.0)])
def test_gate_switches_exactly_one_correct(tmp_path, make_model, tokenizer, gate, fraction):
    """Exactly one correct rollout per group (the first of each group's rows): gate 1 switches, gate 0 does not."""
    rl = two_prompts()
    reward = lambda completions, **k: [float(i % 4 == 0) for i in range(len(completions))]  # noqa: E731
    trainer, (inputs,) = run(tmp_path, make_model, tokenizer, reward, rl, traces_for(rl), method="hpt",
                             hpt_switch_gate=gate)  # fmt: skip
    assert trainer.state.log_history[0]["hpt/sft_prompt_fraction"] == fraction
    assert (inputs[HPT_KEY] == TRACE_ROW).sum() == 2 * fraction


def test_prompt_without_trace_stays_grpo(tmp_path, make_model, tokenizer):
    """Both prompts fail; only '0+1=' has a trace: it switches, '1+2=' stays GRPO (logged as untraced)."""
    rl = two_prompts()
    trainer, (inputs,) = run(tmp_path, make_model, tokenizer, lambda completions, **k: [0.0] * len(completions),
                             rl, traces_for(rl).select([0]), method="hpt")  # fmt: skip
    prompts = tokenizer.batch_decode(inputs["prompt_ids"], skip_special_tokens=True)
    assert all(inputs[HPT_KEY][i] == GRPO_ROW for i, p in enumerate(prompts) if p == "1+2=")
    log = trainer.state.log_history[0]
    assert log["hpt/sft_prompt_fraction"] == 0.5 and log["hpt/untraced_gated_fraction"] == 0.5


def test_coverage_and_config_errors(tmp_path, make_model, tokenizer, rl_dataset):
    other = Dataset.from_dict({"prompt": ["q", "7*7="], "completion": ["another trace", "49"]})
    with pytest.raises(ValueError, match=r"method='hpt': 0 of 32 RL prompts have an expert trace"):
        run(tmp_path / "a", make_model, tokenizer, toy_reward, rl_dataset, other, method="hpt")
    half = traces_for(rl_dataset).select(range(16))
    with pytest.raises(ValueError, match=r"16 of 32 .*hpt_min_trace_coverage`=0.75"):
        run(tmp_path / "b", make_model, tokenizer, toy_reward, rl_dataset, half, method="hpt",
            hpt_min_trace_coverage=0.75)  # fmt: skip
    for bad in (dict(hpt_switch_gate=4), dict(hpt_switch_gate=-1), dict(loss_type="grpo"), dict(hpt_sft_coef=-1.0),
                dict(hpt_min_trace_coverage=1.5), dict(use_adaptive_entropy=True)):  # fmt: skip
        with pytest.raises(ValueError, match="hpt"):
            make_config(tmp_path, method="hpt", **bad)


def test_resume_is_exact(tmp_path, make_model, tokenizer, rl_dataset):
    """Stop after step 2 of 4 (AdamW), resume from the checkpoint: θ, the switch fractions and the data consumed
    as uninterrupted (correct = toy reward ≥ 0.8, so that some groups switch and some do not)."""
    kw = dict(method="hpt", hpt_correct_threshold=0.8, max_steps=4, save_strategy="steps", save_steps=2,
              optim="adamw_torch", learning_rate=1e-2)  # fmt: skip
    sft = traces_for(rl_dataset)
    full, _ = run(tmp_path / "full", make_model, tokenizer, toy_reward, rl_dataset, sft, **kw)
    args = make_config(tmp_path / "resumed", **{**SGD, **kw})
    resumed = BridgeTrainer(make_model(seed=7), toy_reward, args=args, train_dataset=rl_dataset, sft_dataset=sft,
                            processing_class=tokenizer)  # fmt: skip
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "out" / "checkpoint-2"))
    assert_dicts_close(full.get_base_state_dict(), resumed.get_base_state_dict(), atol=1e-6, rtol=1e-5)
    keys = ["hpt/sft_prompt_fraction", "bridge/rl_loss", "bridge/sft_samples", "bridge/rl_samples",
            "bridge/sft_tokens", "bridge/rl_tokens"]  # fmt: skip

    def late(t):
        return [h[k] for h in t.state.log_history if "bridge/rl_loss" in h and h["step"] > 2 for k in keys]

    fractions = [h["hpt/sft_prompt_fraction"] for h in full.state.log_history if "loss" in h]
    assert 0 < sum(fractions) < 4 and len(late(full)) == 2 * len(keys)
    assert late(full) == pytest.approx(late(resumed), abs=1e-6)


# ---------------------------------------------------------------- gradient accumulation, two processes

SCRIPT = (
    ROLLOUTS_SCRIPT_HEAD
    + """
rl = Dataset.from_dict({"prompt": [f"{i}+{i + 1}=" for i in range(12)], "answer": [str(2 * i + 1) for i in range(12)]})
sft = Dataset.from_dict({"prompt": rl["prompt"][::2], "completion": [f"{a}." for a in rl["answer"][::2]]})
reward = lambda completions, **k: [float(sum(map(ord, c)) % 7) / 6.0 for c in completions]
args = BridgeConfig(output_dir=sys.argv[1], method="hpt", per_device_train_batch_size=12 // world // ga,
                    gradient_accumulation_steps=ga, num_generations=4, max_completion_length=6, max_steps=3,
                    optim="sgd", learning_rate=0.1, lr_scheduler_type="constant", weight_decay=0.0, beta=0.0,
                    max_grad_norm=0.0, use_cpu=True, bf16=False, report_to="none", save_strategy="no",
                    logging_steps=1, disable_tqdm=True, seed=0, hpt_sft_coef=0.7, **json.loads(sys.argv[3]))
trainer = BridgeTrainer(build_tiny_model(tok), reward, args=args, train_dataset=rl, sft_dataset=sft,
                        processing_class=tok)
trainer.train()
if trainer.accelerator.is_main_process:
    torch.save(trainer.get_base_state_dict(), os.path.join(sys.argv[1], "theta.pt"))
    json.dump(trainer.state.log_history, open(os.path.join(sys.argv[1], "log.json"), "w"))
"""
)


def launch_hpt(out, nproc, accumulation, overrides):
    import json
    import os
    import subprocess
    import sys

    from .helpers import torchrun_command

    out.mkdir(parents=True)
    script = out / "run_hpt.py"
    script.write_text(SCRIPT)
    args = (out, accumulation, json.dumps(overrides))
    command = (
        torchrun_command(script, *args, nproc=nproc)
        if nproc > 1
        else [sys.executable, str(script), *map(str, args)]
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRL_EXPERIMENTAL_SILENCE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    logs = [h for h in json.loads((out / "log.json").read_text()) if "bridge/rl_loss" in h]
    return torch.load(out / "theta.pt"), logs


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_two_processes_and_accumulation_match_one(tmp_path, recipe):
    """3 groups of G = 4 per step, so that with 2 processes the middle group is split across them: 1 process,
    2 processes, 2 accumulation micro-steps and both, 3 steps: the same θ, switch fractions and consumption.
    No entropy bonus here: TRL's (and verl's) is a mean per micro-batch, which does depend on the split."""
    overrides = {k: v for k, v in RECIPES[recipe].items() if k != "entropy_coef"}
    keys = ["hpt/sft_prompt_fraction", "hpt/trace_length", "bridge/rl_samples", "bridge/rl_tokens",
            "bridge/sft_samples", "bridge/sft_tokens", "reward", "grad_norm"]  # fmt: skip
    runs = {(n, ga): launch_hpt(tmp_path / f"{n}-{ga}", n, ga, overrides) for n, ga in
            [(1, 1), (2, 1), (1, 2), (2, 2)]}  # fmt: skip
    theta, logs = runs[1, 1]
    fractions = [h["hpt/sft_prompt_fraction"] for h in logs]
    assert len(logs) == 3 and 0 < sum(fractions) < 3  # some prompts switched, some did not
    for theta_b, logs_b in runs.values():
        assert_dicts_close(theta, theta_b, atol=1e-6, rtol=1e-5)
        for h1, h2 in zip(logs, logs_b, strict=True):
            assert [h1[k] for k in keys] == pytest.approx([h2[k] for k in keys], abs=1e-5)


@pytest.mark.slow
def test_recipe_through_the_cli(tmp_path):
    """The shipped recipe, shrunk, through `bridge-trl train`: DeepMath traces paired with the RL queries by
    `data.py` are found by hpt under the same rendered prompts, and the tiny policy's failures switch to them."""
    import ast

    from .test_cli import run_cli, write_recipe

    result = run_cli(write_recipe(tmp_path, "hpt"))
    logs = [ast.literal_eval(line) for line in result.stdout.splitlines() if line.startswith("{'loss'")]
    assert len(logs) == 2
    assert sum(float(h["hpt/sft_prompt_fraction"]) for h in logs) > 0
    assert float(logs[-1]["bridge/sft_samples"]) > 0
