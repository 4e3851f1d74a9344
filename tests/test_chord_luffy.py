"""CHORD and LUFFY (`method: chord` / `luffy`), each checked on the tiny model against an independent computation."""

import ast
import json
import math

import pytest
import torch
from datasets import Dataset

from bridge_trl import BridgeTrainer
from bridge_trl.chord import mu_at
from bridge_trl.luffy import OFF_POLICY_KEY, LuffyTraces, off_policy_token_loss, substitute_traces
from bridge_trl.sft import SFTBatch, sft_loss, tokenize_sft_dataset

from .conftest import toy_reward
from .helpers import assert_dicts_close, make_config, make_trainer

SGD = dict(optim="sgd", weight_decay=0.0, max_grad_norm=0.0, lr_scheduler_type="constant", beta=0.0)


def train(tmp_path, make_model, tokenizer, rl, sft, **overrides):
    trainer = make_trainer(tmp_path, make_model(), tokenizer, rl, sft, **SGD, **overrides)
    trainer.train()
    return trainer


def tied_grads(model) -> dict:
    grads = {n: p.grad.double().clone() for n, p in model.named_parameters()}
    grads["lm_head.weight"] = grads["model.embed_tokens.weight"]  # tied embeddings: one parameter, two names
    return grads


# ---------------------------------------------------------------- CHORD


def test_mu_schedule_hand_values():
    # warm-up 4 steps to 0.9, cosine decay over 4 steps to 0.05, then 0.05
    values = [mu_at(k, 4, 4, 0.9, 0.05) for k in range(10)]
    expected = [0.0, 0.225, 0.45, 0.675, 0.9, 0.05 + 0.85 * (1 + math.cos(math.pi / 4)) / 2, 0.475,
                0.05 + 0.85 * (1 + math.cos(3 * math.pi / 4)) / 2, 0.05, 0.05]  # fmt: skip
    assert values == pytest.approx(expected, abs=1e-12)
    assert mu_at(7, 0, 0, 0.9, 0.3) == 0.3  # no warm-up, no decay: the valley
    assert mu_at(3, 0, 5, 0.4, 0.4) == 0.4  # peak = valley: constant


def test_phi_weighted_nll_hand_computed(make_model, tokenizer):
    """sft_loss(phi=True) = Σ p(1-p)·(−log p) / N, p detached in the weight, against an explicit softmax in fp64."""
    model = make_model()
    rows = [([5, 6, 7], [8, 9, 10, 2]), ([11, 5, 6], [12, 2])]  # (prompt, completion) ids, same prompt length
    c_len = max(len(c) for _, c in rows)
    ids = torch.tensor([p + c + [0] * (c_len - len(c)) for p, c in rows])
    attn = torch.tensor([[1] * (len(p) + len(c)) + [0] * (c_len - len(c)) for p, c in rows])
    cmask = torch.tensor([[1] * len(c) + [0] * (c_len - len(c)) for _, c in rows])
    loss = sft_loss(model, SFTBatch(ids, attn, cmask, normalizer=6.0), fused_lm_head=False, phi=True)
    loss.backward()
    got = tied_grads(model)

    model.zero_grad()
    expected_loss = 0.0
    for p, c in rows:
        logits = model(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1 : -1].double()  # (C, V)
        probs = torch.softmax(logits, -1)[torch.arange(len(c)), torch.tensor(c)]  # p of each target token
        phi = (probs * (1 - probs)).detach()
        expected_loss = expected_loss + (phi * -probs.log()).sum() / 6.0
    expected_loss.backward()
    assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-5)
    assert_dicts_close(got, tied_grads(model), atol=1e-7, rtol=1e-4)


def test_chord_with_mu_zero_is_rl(tmp_path, make_model, tokenizer, rl_dataset, sft_dataset):
    chord = train(tmp_path / "c", make_model, tokenizer, rl_dataset, sft_dataset, method="chord", max_steps=2,
                  chord_mu_peak=0.0, chord_mu_valley=0.0)  # fmt: skip
    rl = train(tmp_path / "r", make_model, tokenizer, rl_dataset, sft_dataset, method="rl", max_steps=2)
    assert_dicts_close(chord.get_base_state_dict(), rl.get_base_state_dict(), atol=0, rtol=0)
    assert [h["bridge/mu"] for h in chord.state.log_history if "bridge/mu" in h] == [0.0, 0.0]


def test_chord_without_phi_is_mix(tmp_path, make_model, tokenizer, rl_dataset, sft_dataset):
    """chord_phi=False, constant μ = 0.3: the `mix` update with λ = 1 − μ = 0.7."""
    chord = train(tmp_path / "c", make_model, tokenizer, rl_dataset, sft_dataset, method="chord", max_steps=2,
                  chord_phi=False, chord_mu_peak=0.3, chord_mu_valley=0.3)  # fmt: skip
    mix = train(tmp_path / "m", make_model, tokenizer, rl_dataset, sft_dataset, method="mix", max_steps=2,
                bridge_lambda=0.7)  # fmt: skip
    assert_dicts_close(chord.get_base_state_dict(), mix.get_base_state_dict(), atol=1e-7, rtol=0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chord_sft_part_and_mu_log(tmp_path, make_model, tokenizer, rl_dataset, sft_dataset, temperature):
    """μ ≡ 1: θ¹ = θ⁰ − α ∇L_SFT-φ(θ⁰), L_SFT-φ computed directly (fp64, one example at a time); logs μ(k). At a
    rollout temperature T ≠ 1 the SFT log-probs and φ come from logits / T, as in Trinity-RFT's CHORD."""
    lr = 0.1
    trainer = train(tmp_path, make_model, tokenizer, rl_dataset, sft_dataset, method="chord", learning_rate=lr,
                    chord_mu_peak=1.0, chord_mu_valley=1.0, per_device_sft_batch_size=len(sft_dataset),
                    temperature=temperature)  # fmt: skip
    model = make_model()
    theta0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    nll, count = 0.0, 0
    for prompt, completion in zip(sft_dataset["prompt"], sft_dataset["completion"], strict=True):
        p_ids = tokenizer(prompt)["input_ids"]
        c_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        logits = model(input_ids=torch.tensor([p_ids + c_ids])).logits[0, len(p_ids) - 1 : -1].double()
        logp = torch.log_softmax(logits / temperature, -1)[torch.arange(len(c_ids)), torch.tensor(c_ids)]
        nll = nll - (logp.exp() * (1 - logp.exp())).detach().mul(logp).sum()
        count += len(c_ids)
    (nll / count).backward()
    grads = tied_grads(model)
    expected = {k: theta0[k].double() - lr * grads[k] for k in theta0}
    assert_dicts_close(trainer.get_base_state_dict(), expected, atol=1e-6, rtol=1e-4)
    log = trainer.state.log_history[0]
    assert log["bridge/mu"] == 1.0 and log["bridge/sft_loss"] == pytest.approx(nll.item() / count, rel=1e-4)


# ---------------------------------------------------------------- LUFFY


def test_substitute_traces_last_slots_of_each_group():
    traces = {(1,): [[7, 2]], (3,): [[8, 2], [9, 2]]}
    prompts = [(1,)] * 4 + [(2,)] * 4 + [(3,)] * 4
    completions = [[0]] * 12
    # rows 4..11 of a global batch: groups (2,) and (3,) of G = 4, two off-policy slots each
    out, off = substitute_traces(prompts[4:], completions[4:], 4, 4, 2, lambda p: traces.get(tuple(p), []))
    assert off == [False] * 4 + [False, False, True, True]  # (2,) has no trace: a plain on-policy group
    assert out[6:] == [[8, 2], [9, 2]] and out[:6] == [[0]] * 6


def test_traces_keyed_by_rendered_prompt_and_truncated(tokenizer, caplog):
    """Prompts compare after rendering and `normalize_question`; a trace over max_completion_length is cut to it."""
    sft = tokenize_sft_dataset(
        Dataset.from_dict({"prompt": ["What is 2+3?", "a long one"], "completion": ["5", "x" * 9]}),
        lambda prompts: ([tokenizer(p)["input_ids"] for p in prompts], None, None), tokenizer,
        [tokenizer.eos_token_id],
    )  # fmt: skip
    with caplog.at_level("WARNING"):
        traces = LuffyTraces(sft, tokenizer.decode, max_completion_length=6)
    assert "1 of 2 traces" in caplog.text
    eos = tokenizer.eos_token_id
    assert traces.lookup(tokenizer("what is  2 + 3 ?")["input_ids"]) == [[*tokenizer("5")["input_ids"], eos]]
    assert traces.lookup(tokenizer("A long one")["input_ids"]) == [tokenizer("x" * 6)["input_ids"]]  # no EOS
    assert traces.lookup(tokenizer("What is 2+4?")["input_ids"]) == []


def test_off_policy_token_gradient_is_shaped_probability():
    """∂(−A f(π))/∂z for π = softmax(z)_k, f(π) = π/(π+γ), against the closed form −A γ π (e_k − softmax z)/(π+γ)²."""
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11, dtype=torch.float64, requires_grad=True)  # (B, T, V)
    targets = torch.randint(0, 11, (3, 5))
    advantages = torch.tensor([0.7, -1.3, 0.2], dtype=torch.float64)
    gamma = 0.1
    logps = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    off_policy_token_loss(logps, advantages, gamma).sum().backward()
    soft = torch.softmax(logits.detach(), -1)
    pi = soft.gather(-1, targets.unsqueeze(-1))  # (B, T, 1)
    one_hot = torch.nn.functional.one_hot(targets, 11).double()
    expected = -advantages[:, None, None] * gamma * pi / (pi + gamma) ** 2 * (one_hot - soft)
    torch.testing.assert_close(logits.grad, expected, atol=1e-12, rtol=1e-10)


@pytest.fixture
def traces(rl_dataset):
    """One short expert trace for every RL prompt (≤ 4 tokens + EOS, under max_completion_length = 6)."""
    return Dataset.from_dict(
        {"prompt": list(rl_dataset["prompt"]), "completion": [f"{a}." for a in rl_dataset["answer"]]}
    )


def test_luffy_without_matching_traces_is_refused(tmp_path, make_model, tokenizer, rl_dataset):
    """No RL prompt has a trace: an error before any step that says how many matched, not silent GRPO."""
    other = Dataset.from_dict({"prompt": ["q", "7*7="], "completion": ["another trace", "49"]})
    with pytest.raises(ValueError, match=r"0 of 32 RL prompts have an expert trace"):
        train(tmp_path / "l", make_model, tokenizer, rl_dataset, other, method="luffy", max_steps=2)


# The default (dapo: one token mean, std-scaled advantages) and the reference's training script: no std scaling,
# the sum over tokens / (rows × max length) (`loss_remove_token_mean`, TRL's dr_grpo), an entropy bonus over every
# completion token, traces included (a large coefficient here, so that a bonus over on-policy tokens only fails).
RECIPES = {"dapo": dict(loss_type="dapo"),
           "reference": dict(loss_type="dr_grpo", scale_rewards="none", entropy_coef=0.05)}  # fmt: skip


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_luffy_update_and_advantages_direct(tmp_path, make_model, tokenizer, rl_dataset, traces, recipe):
    """One step of luffy (G = 4, one trace per group) against a direct fp64 computation of the mixed group's
    advantages and of θ¹ = θ⁰ − α ∇ (1/N)[Σ_on −A r(θ) + Σ_off −A f(π_θ)] (− c H̄), r = π/π_old at π_old = π_θ⁰."""
    lr, gamma, kw = 0.1, 0.1, RECIPES[recipe]
    trainer = make_trainer(tmp_path, make_model(), tokenizer, rl_dataset, traces, method="luffy", learning_rate=lr,
                           luffy_shaping_gamma=gamma, **SGD, **kw)  # fmt: skip
    captured = []
    compute = trainer._compute_loss
    trainer._compute_loss = lambda model, inputs: captured.append(dict(inputs)) or compute(model, inputs)
    trainer.train()
    (inputs,) = captured
    off, cmask = inputs[OFF_POLICY_KEY], inputs["completion_mask"]
    prompts = tokenizer.batch_decode(inputs["prompt_ids"], skip_special_tokens=True)
    answers = dict(zip(rl_dataset["prompt"], rl_dataset["answer"], strict=True))

    # The mixed groups: one trace per prompt, tokenized as SFT completions are, under the RL prompt itself.
    completions = []
    for i, prompt in enumerate(prompts):
        ids = inputs["completion_ids"][i][cmask[i].bool()].tolist()
        if off[i]:
            assert ids == tokenizer(f"{answers[prompt]}.", add_special_tokens=False)["input_ids"] + [
                tokenizer.eos_token_id
            ]
        completions.append(tokenizer.decode(ids, skip_special_tokens=True))
    groups = {p: [i for i, q in enumerate(prompts) if q == p] for p in set(prompts)}
    assert len(groups) == 2 and all(off[idx].sum() == 1 and len(idx) == 4 for idx in groups.values())
    assert trainer.state.log_history[0]["luffy/trace_group_fraction"] == 1.0

    # Advantages: (r − mean) / (std + 1e-4) over each mixed group (no division with scale_rewards="none"), the
    # trace scored by the reward like the rest.
    rewards = torch.tensor(toy_reward([f"{answers[p]}." if off[i] else c for i, (p, c) in
                                       enumerate(zip(prompts, completions, strict=True))]), dtype=torch.float64)  # fmt: skip
    expected_adv = torch.zeros(len(prompts), dtype=torch.float64)
    for idx in groups.values():
        r = rewards[idx]
        expected_adv[idx] = (r - r.mean()) / (r.std() + 1e-4 if kw.get("scale_rewards") != "none" else 1.0)
    torch.testing.assert_close(inputs["advantages"].double(), expected_adv, atol=1e-6, rtol=1e-5)

    # θ¹ from a direct fp64 computation on the captured batch.
    model = make_model().double()
    theta0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attn = torch.cat([inputs["prompt_mask"], cmask], 1)
    t = cmask.size(1)
    logits = model(input_ids=ids, attention_mask=attn).logits[:, -t - 1 : -1]  # (B, T, V)
    probs = torch.softmax(logits, -1).gather(-1, inputs["completion_ids"].unsqueeze(-1)).squeeze(-1)  # π_θ(t)
    adv = inputs["advantages"].double()[:, None]
    on_term = -adv * probs / probs.detach()  # GRPO's ratio at π_old = π_θ⁰: unclipped there
    off_term = -adv * probs / (probs + gamma)  # f(π_θ(t)), behaviour probability 1, unclipped
    per_token = torch.where(off[:, None], off_term, on_term)
    if kw["loss_type"] == "dapo":
        loss = (per_token * cmask).sum() / cmask.sum()  # one token mean over every completion token
    else:  # dr_grpo: rows × max_completion_length (6 in the tests)
        loss = (per_token * cmask).sum() / (cmask.size(0) * 6)
    if "entropy_coef" in kw:  # the mean token entropy over every completion token
        logsoft = torch.log_softmax(logits, -1)
        entropy = -(logsoft.exp() * logsoft).sum(-1)  # (B, T)
        loss = loss - kw["entropy_coef"] * (entropy * cmask).sum() / cmask.sum()
    loss.backward()
    grads = tied_grads(model)
    expected = {k: theta0[k] - lr * grads[k] for k in theta0}
    assert_dicts_close(trainer.get_base_state_dict(), expected, atol=1e-6, rtol=1e-4)
    off_prob = (probs.detach() * cmask * off[:, None]).sum() / (cmask * off[:, None]).sum()
    assert trainer.state.log_history[0]["luffy/off_policy_prob"] == pytest.approx(off_prob.item(), rel=1e-4)


def trace_reward(completions, answer, **kwargs):
    """1 for the expert trace's text only: the random tiny policy never writes it."""
    return [float(c == f"{a}.") for c, a in zip(completions, answer, strict=True)]


def test_luffy_metrics_separate_traces_from_rollouts(tmp_path, make_model, tokenizer, rl_dataset, traces):
    """TRL's reward and completion metrics describe the policy's own rollouts; the traces are logged under luffy/
    and counted as SFT data consumed (2 steps, 2 groups of G = 4 per step, one trace each)."""
    trainer = BridgeTrainer(make_model(), trace_reward, args=make_config(tmp_path, method="luffy", max_steps=2, **SGD),
                            train_dataset=rl_dataset, sft_dataset=traces, processing_class=tokenizer)  # fmt: skip
    captured = []
    compute = trainer._compute_loss
    trainer._compute_loss = lambda model, inputs: captured.append(dict(inputs)) or compute(model, inputs)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["reward"] for h in logs] == [0.0, 0.0]  # the mixed batch would read 2/8 = 0.25
    assert [h["rewards/trace_reward/mean"] for h in logs] == [0.0, 0.0]
    assert [h["luffy/trace_reward"] for h in logs] == [1.0, 1.0]
    assert [h["luffy/traces"] for h in logs] == [2, 2]
    seen = 0
    for step, (inputs, log) in enumerate(zip(captured, logs, strict=True), start=1):
        off, lengths = inputs[OFF_POLICY_KEY], inputs["completion_mask"].sum(1).double()
        assert log["completions/mean_length"] == pytest.approx(lengths[~off].mean().item())
        assert log["luffy/trace_length"] == pytest.approx(lengths[off].mean().item())
        seen += (inputs["prompt_mask"].sum(1) + lengths)[~off].sum().item()
        assert log["num_tokens"] == seen  # the policy's own prompt + completion tokens only
        assert log["bridge/rl_samples"] == 6 * step and log["bridge/sft_samples"] == 2 * step
    trace_tokens = sum((i["completion_mask"].sum(1) * i[OFF_POLICY_KEY]).sum().item() for i in captured)
    rl_tokens = sum((i["completion_mask"].sum(1) * ~i[OFF_POLICY_KEY]).sum().item() for i in captured)
    assert logs[-1]["bridge/sft_tokens"] == trace_tokens and logs[-1]["bridge/rl_tokens"] == rl_tokens


def test_luffy_config_errors(tmp_path):
    with pytest.raises(ValueError, match="luffy_num_off_policy"):
        make_config(tmp_path, method="luffy", luffy_num_off_policy=4)
    with pytest.raises(ValueError, match="loss_type"):
        make_config(tmp_path, method="luffy", loss_type="grpo")
    with pytest.raises(ValueError, match="use_adaptive_entropy"):
        make_config(tmp_path, method="luffy", use_adaptive_entropy=True)
    with pytest.raises(ValueError, match="luffy_shaping_gamma"):
        make_config(tmp_path, method="luffy", luffy_shaping_gamma=0.0)
    with pytest.raises(ValueError, match="chord_mu_peak"):
        make_config(tmp_path, method="chord", chord_mu_peak=1.5)


# ---------------------------------------------------------------- resume, several processes


@pytest.mark.parametrize("method", ["chord", "luffy"])
def test_resume_is_exact(tmp_path, make_model, tokenizer, rl_dataset, traces, method):
    """Stop after step 2 of 4 (AdamW), resume from the checkpoint: θ and the late steps' metrics as uninterrupted."""
    kw = dict(method=method, max_steps=4, save_strategy="steps", save_steps=2, optim="adamw_torch", learning_rate=1e-2,
              chord_mu_warmup_steps=2, chord_mu_decay_steps=2, chord_mu_peak=0.9, chord_mu_valley=0.05)  # fmt: skip
    full = make_trainer(tmp_path / "full", make_model(), tokenizer, rl_dataset, traces, **kw)
    full.train()
    resumed = make_trainer(tmp_path / "resumed", make_model(seed=7), tokenizer, rl_dataset, traces, **kw)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "out" / "checkpoint-2"))
    assert_dicts_close(full.get_base_state_dict(), resumed.get_base_state_dict(), atol=1e-6, rtol=1e-5)
    keys = {"chord": ["bridge/sft_loss", "bridge/rl_loss", "bridge/mu", "reward"],
            "luffy": ["bridge/rl_loss", "reward", "luffy/trace_group_fraction", "luffy/off_policy_prob"]}[method]  # fmt: skip

    def late(t):
        return [h[k] for h in t.state.log_history if "bridge/rl_loss" in h and h["step"] > 2 for k in keys]

    assert len(late(full)) == 2 * len(keys)
    assert late(full) == pytest.approx(late(resumed), abs=1e-6)


def launch_method(out, launcher, method, **env):
    from .test_distributed import launch

    states, _ = launch(out, launcher, BRIDGE_TEST_METHOD=method, **env)
    logs = [h for h in json.loads((out / "log.json").read_text()) if "bridge/rl_loss" in h]
    return states, logs


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("launcher", ["ddp", "zero2", "zero3"])
@pytest.mark.parametrize("method", ["chord", "luffy", "cold_start"])
def test_two_processes_match_one(tmp_path, method, launcher):
    """tests/scripts/run_bridge.py: deterministic rollouts, so one and two processes train on the same batch.
    cold_start: 2 SFT steps then 2 RL steps with β = 0.1 and a LoRA adapter, so the KL reference written at the
    switch is π(θ_SFT, w) merged (gathered under ZeRO-3): KL 0 at the first RL step on every backend."""
    if launcher != "ddp":
        pytest.importorskip("deepspeed")
    env = {"BRIDGE_TEST_GA": "2"} if launcher != "ddp" else {}
    extra = {"BRIDGE_TEST_BETA": "0.1", "BRIDGE_TEST_MAX_STEPS": "4"} if method == "cold_start" else {}
    (one, one_logs), (two, two_logs) = (
        launch_method(tmp_path / "one", "python", method, **extra),
        launch_method(tmp_path / "two", launcher, method, **env, **extra),
    )
    for a, b in zip(one, two, strict=True):
        assert_dicts_close(a, b, atol=1e-6, rtol=1e-5)
    keys = {"chord": ["bridge/sft_loss", "bridge/rl_loss", "bridge/mu", "reward", "grad_norm"],
            "luffy": ["bridge/rl_loss", "reward", "luffy/trace_group_fraction", "luffy/off_policy_prob",
                      "grad_norm"],
            "cold_start": ["bridge/rl_loss", "reward", "kl", "grad_norm"]}[method]  # fmt: skip
    assert len(one_logs) == len(two_logs) == 2
    for h1, h2 in zip(one_logs, two_logs, strict=True):
        assert [h1[k] for k in keys] == pytest.approx([h2[k] for k in keys], abs=1e-5)
    if method == "luffy":
        assert sum(h["luffy/trace_group_fraction"] for h in one_logs) > 0  # traces did enter the groups
    if method == "cold_start":
        # merged W + ΔW in the reference against the unmerged adapter in the policy: equal up to rounding
        assert max(abs(one_logs[0]["kl"]), abs(two_logs[0]["kl"])) < 1e-8 and one_logs[1]["kl"] > 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("method", ["chord", "luffy"])
def test_recipe_through_the_cli(tmp_path, method):
    """The shipped recipe, shrunk, through examples/train_bridge.py: DeepMath traces paired with the RL queries by
    `data.py` are found by luffy under the same rendered prompts (2 steps of 2 groups: 4 groups, 2-3 paired)."""
    from .test_cli import run_cli, write_recipe

    result = run_cli(write_recipe(tmp_path, method))
    logs = [ast.literal_eval(line) for line in result.stdout.splitlines() if line.startswith("{'loss'")]
    assert len(logs) == 2
    if method == "chord":  # CHORD-μ: cosine decay 0.9 → 0.05 over 200 steps, as float-formatted by the log
        mu_1 = 0.05 + 0.85 * 0.5 * (1 + math.cos(math.pi / 200))
        assert [float(h["bridge/mu"]) for h in logs] == pytest.approx([0.9, mu_1], rel=1e-3)
    else:
        assert sum(float(h["luffy/trace_group_fraction"]) for h in logs) > 0
