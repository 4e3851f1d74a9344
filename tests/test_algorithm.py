"""Algorithm 2, checked against independent computations on a tiny model (DESIGN.md §1)."""

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

from .helpers import assert_dicts_close, diff, make_trainer, max_abs, snapshot

SGD = {
    "optim": "sgd",
    "weight_decay": 0.0,
    "max_grad_norm": 0.0,
    "lr_scheduler_type": "constant",
    "beta": 0.0,
}


def lora(**kw):
    # init_lora_weights=False gives B ≠ 0, so w⁰ changes the policy and its gradient is non-trivial.
    return LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, **kw)


def reference_sft_gradients(make_model, tokenizer, theta0, w0, dataset):
    """∇_θ and ∇_w of the mean token NLL of completions + EOS, computed one unpadded example at a time."""
    model = get_peft_model(make_model(), lora())
    with torch.no_grad():
        for name, p in model.get_base_model().named_parameters():
            if "lora_" not in name:
                p.copy_(theta0[name.replace(".base_layer", "")])
    set_peft_model_state_dict(model, w0)
    for p in model.parameters():
        p.requires_grad_(True)
    nll, count = 0.0, 0
    for prompt, completion in zip(dataset["prompt"], dataset["completion"], strict=True):
        p_ids = tokenizer(prompt)["input_ids"]
        c_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        logits = model(input_ids=torch.tensor([p_ids + c_ids])).logits[0]
        logp = torch.log_softmax(logits[len(p_ids) - 1 : -1].double(), dim=-1)
        nll = nll + -logp[torch.arange(len(c_ids)), torch.tensor(c_ids)].sum()
        count += len(c_ids)
    (nll / count).backward()
    g_theta, g_w = {}, {}
    for name, p in model.named_parameters():
        if "lora_" in name:
            g_w[name.replace(".default", "")] = p.grad.double()
        else:
            g_theta[name.removeprefix("base_model.model.").replace(".base_layer", "")] = p.grad.double()
    g_theta["lm_head.weight"] = g_theta["model.embed_tokens.weight"]  # tied: one parameter, one gradient
    return g_theta, g_w


def train_step0(trainer, make_model, tokenizer, sft_dataset, alpha, beta, lam) -> dict:
    """Train the one step of `trainer` and return both sides of DESIGN.md §1's step-0 identity:
    Δθ − λΔθ̂ against −α(1−λ)∇_θ L_SFT, and Δw against −β(1−λ)∇_w L_SFT, the gradients computed independently on a
    fresh model (other random weights) overwritten with θ⁰ and w⁰, in float64 on the CPU."""
    theta0, shadow0, w0 = snapshot(trainer)
    assert_dicts_close(theta0, shadow0, atol=0, rtol=0)
    trainer.train()
    theta1, shadow1, w1 = snapshot(trainer)
    g_theta, g_w = reference_sft_gradients(lambda: make_model(seed=123), tokenizer, theta0, w0, sft_dataset)
    d_theta, d_shadow, d_w = diff(theta1, theta0), diff(shadow1, shadow0), diff(w1, w0)
    assert max_abs(d_shadow) > 1e-4, "the RL gradient should move θ̂"
    return {"theta_combination": {k: d_theta[k] - lam * d_shadow[k] for k in d_theta},
            "theta_expected": {k: -alpha * (1 - lam) * g_theta[k] for k in d_theta},
            "w_step": d_w, "w_expected": {k: -beta * (1 - lam) * g_w[k] for k in d_w},
            "theta_step": d_theta, "shadow_step": d_shadow, "g_theta": g_theta, "theta1": theta1, "shadow1": shadow1}  # fmt: skip


def test_step0_identity_with_sgd(tmp_path, make_model, tokenizer, rl_dataset, sft_dataset):
    """Δθ − λΔθ̂ = −α(1−λ)∇_θ L_SFT and Δw = −β(1−λ)∇_w L_SFT at step 0, where θ̂ = θ."""
    alpha, beta, lam = 0.2, 0.07, 0.3
    trainer = make_trainer(
        tmp_path, make_model(), tokenizer, rl_dataset, sft_dataset, peft_config=lora(),
        learning_rate=alpha, adapter_learning_rate=beta, bridge_lambda=lam,
        per_device_sft_batch_size=len(sft_dataset), **SGD,
    )  # fmt: skip
    assert trainer.model.get_base_model().config.tie_word_embeddings
    step = train_step0(trainer, make_model, tokenizer, sft_dataset, alpha, beta, lam)
    assert_dicts_close(step["theta_combination"], step["theta_expected"], atol=1e-6, rtol=1e-4)
    assert_dicts_close(step["w_step"], step["w_expected"], atol=1e-6, rtol=1e-4)
    theta1, shadow1 = step["theta1"], step["shadow1"]
    # Tied weights stay tied in θ and θ̂.
    assert torch.equal(theta1["lm_head.weight"], theta1["model.embed_tokens.weight"])
    assert torch.equal(shadow1["lm_head.weight"], shadow1["model.embed_tokens.weight"])


def test_lambda_one_shadow_and_base_take_the_same_rl_step(
    tmp_path, make_model, tokenizer, rl_dataset, sft_dataset
):
    """With λ = 1 the joint loss is RL only: at step 0 θ and θ̂ move identically and g_w = 0."""
    trainer = make_trainer(tmp_path, make_model(), tokenizer, rl_dataset, sft_dataset, peft_config=lora(),
                           learning_rate=0.2, bridge_lambda=1.0, **SGD)  # fmt: skip
    theta0, _, w0 = snapshot(trainer)
    trainer.train()
    theta1, shadow1, w1 = snapshot(trainer)
    assert max_abs(diff(theta1, theta0)) > 1e-4
    assert_dicts_close(theta1, shadow1, atol=1e-7, rtol=0)
    assert_dicts_close(w1, w0, atol=1e-7, rtol=0)


def test_shadow_moves_by_rl_only(tmp_path, make_model, tokenizer, rl_dataset, sft_dataset):
    """θ̂'s step does not depend on the SFT data; θ's does."""
    other_sft = Dataset.from_dict({"prompt": ["x"] * 4, "completion": ["completely different trace"] * 4})
    results = []
    for i, data in enumerate((sft_dataset, other_sft)):
        trainer = make_trainer(tmp_path / str(i), make_model(), tokenizer, rl_dataset, data, peft_config=lora(),
                               learning_rate=0.2, bridge_lambda=0.5, **SGD)  # fmt: skip
        before = snapshot(trainer)
        trainer.train()
        results.append([diff(a, b) for a, b in zip(snapshot(trainer), before, strict=True)])
    (d_theta_a, d_shadow_a, _), (d_theta_b, d_shadow_b, _) = results
    assert max_abs(d_shadow_a) > 1e-4
    assert_dicts_close(d_shadow_a, d_shadow_b, atol=1e-7, rtol=0)
    assert max_abs({k: d_theta_a[k] - d_theta_b[k] for k in d_theta_a}) > 1e-4


def test_gradient_accumulation_matches_larger_batch(tmp_path, make_model, tokenizer, rl_dataset, sft_dataset):
    """2 micro-batches of b accumulate to the same update as 1 batch of 2b (θ, θ̂ and w)."""
    states = []
    for i, (bs, accum, sft_bs) in enumerate(((8, 2, 2), (16, 1, 4))):
        trainer = make_trainer(tmp_path / str(i), make_model(), tokenizer, rl_dataset, sft_dataset, peft_config=lora(),
                               per_device_train_batch_size=bs, gradient_accumulation_steps=accum,
                               per_device_sft_batch_size=sft_bs, learning_rate=0.1, **SGD)  # fmt: skip
        trainer.train()
        states.append(snapshot(trainer))
        assert trainer.state.log_history[0]["bridge/sft_loss"] > 0
    for a, b in zip(*states, strict=True):
        assert_dicts_close(a, b, atol=2e-6, rtol=1e-5)


def test_cpu_offloaded_shadow_matches_resident_shadow(
    tmp_path, make_model, tokenizer, rl_dataset, sft_dataset
):
    """shadow_offload='cpu' moves θ̂ between memories but computes the same three updates (2 steps, AdamW)."""
    states = []
    for offload in ("none", "cpu"):
        trainer = make_trainer(tmp_path / offload, make_model(), tokenizer, rl_dataset, sft_dataset,
                               peft_config=lora(), max_steps=2, gradient_accumulation_steps=2,
                               per_device_train_batch_size=4, learning_rate=1e-2, shadow_offload=offload)  # fmt: skip
        trainer.train()
        assert all(p.device.type == "cpu" for p in trainer.shadow.params)
        states.append(snapshot(trainer))
        assert (
            trainer.state.log_history[0]["bridge/shadow_mb"] > trainer.shadow.num_bytes() / 2**20
        )  # + Adam state
    for a, b in zip(*states, strict=True):
        assert_dicts_close(a, b, atol=0, rtol=0)


def test_stateless_sgd_shadow_optimizer(tmp_path, make_model, tokenizer, rl_dataset, sft_dataset):
    """shadow_optimizer='sgd' keeps no state; at step 0 its θ̂ update is −α g_θ̂, which λ = 1 makes θ's SGD update."""
    trainer = make_trainer(tmp_path, make_model(), tokenizer, rl_dataset, sft_dataset, peft_config=lora(),
                           learning_rate=0.2, bridge_lambda=1.0, shadow_optimizer="sgd", **SGD)  # fmt: skip
    trainer.train()
    theta1, shadow1, _ = snapshot(trainer)
    assert isinstance(trainer.shadow_optimizer, torch.optim.SGD) and len(trainer.shadow_optimizer.state) == 0
    assert_dicts_close(theta1, shadow1, atol=1e-7, rtol=0)


def _norm(d: dict, tied=("lm_head.weight",)) -> float:
    return sum(v.double().pow(2).sum().item() for k, v in d.items() if k not in tied) ** 0.5


def test_clipping_is_per_update(tmp_path, make_model, tokenizer, rl_dataset, sft_dataset):
    """max_grad_norm clips θ (Eq. 8), w (Eq. 11) and θ̂ (Eq. 10) each on the norm of its own gradient.

    An unclipped SGD step gives the three gradients g = −Δ/lr; with clipping active on all three, each clipped
    step must be Δ · c / ‖g‖ for its own g (computed here by hand). A joint θ+w norm would shrink θ's step by the
    cooperative-gain term that only w's gradient carries.
    """
    alpha, beta = 0.2, 0.07
    common = dict(peft_config=lora(), learning_rate=alpha, adapter_learning_rate=beta, bridge_lambda=0.5,
                  **{**SGD, "max_grad_norm": 0.0})  # fmt: skip
    free = make_trainer(tmp_path / "free", make_model(), tokenizer, rl_dataset, sft_dataset, **common)
    start = snapshot(free)
    free.train()
    steps = [diff(a, b) for a, b in zip(snapshot(free), start, strict=True)]  # Δθ, Δθ̂, Δw
    norms = [_norm(d) / lr for d, lr in zip(steps, (alpha, alpha, beta), strict=True)]  # ‖g_θ‖, ‖g_θ̂‖, ‖g_w‖
    c = 0.5 * min(norms)
    assert max(norms) / min(norms) > 1.5  # different norms, so a shared factor would show

    clipped = make_trainer(tmp_path / "clip", make_model(), tokenizer, rl_dataset, sft_dataset,
                           **{**common, "max_grad_norm": c})  # fmt: skip
    clipped.train()
    for got, before, d, norm in zip(snapshot(clipped), start, steps, norms, strict=True):
        assert_dicts_close(diff(got, before), {k: v * c / norm for k, v in d.items()}, atol=1e-7, rtol=1e-4)
    log = clipped.state.log_history[0]
    assert log["grad_norm"] == pytest.approx(norms[0], rel=1e-4)
    assert log["bridge/shadow_grad_norm"] == pytest.approx(norms[1], rel=1e-4)
    assert log["bridge/adapter_grad_norm"] == pytest.approx(norms[2], rel=1e-4)
