"""Upper-level diagnostics (`bridge_trl.diagnostics`, issue 27), each against an independent computation.

The gain terms are recomputed with `torch.autograd.grad` on every loss the step backpropagates, at the same weights
and on the same batches (the trainer's `.grad` bookkeeping is what is under test); drift, share and updates from
the public state accessors read before and after each step.
"""

import pytest
import torch
from peft import LoraConfig
from transformers import TrainerCallback

from bridge_trl.diagnostics import optimizer_update_square

from .helpers import make_trainer

GAIN_KEYS = ("bridge/gain_grad_ratio", "bridge/gain_grad_cos", "bridge/shadow_drift")
ADAPTER_KEYS = ("bridge/adapter_share", "bridge/adapter_update", "bridge/theta_update")


def lora(**kw):
    return LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", **kw)  # scaling 2


class Snapshots(TrainerCallback):
    """(θ, θ̂, w) at the start and end of every step, through the public accessors."""

    def __init__(self, trainer):
        self.trainer, self.begin, self.end = trainer, [], []

    def _read(self):
        t = self.trainer
        shadow = t.get_shadow_state_dict() if t.args.method == "bridge" else {}
        return t.get_base_state_dict(), shadow, t.get_adapter_state_dict()

    def on_step_begin(self, *a, **k):
        self.begin.append(self._read())

    def on_step_end(self, *a, **k):
        self.end.append(self._read())


def record_gradients(trainer):
    """Per step: Σ over micro-steps of weight · ∇_w(loss) for each backward kind, by autograd, without `.grad`."""
    terms, original = [], trainer._weighted_backward
    w = [p for n, p in trainer.model.named_parameters() if "lora_" in n]

    def recording(compute, weight, kind=""):
        if kind in ("sft", "rl", "shadow") and weight != 0.0:
            step = trainer.state.global_step
            while len(terms) <= step:
                terms.append({})
            with torch.enable_grad():
                grads = torch.autograd.grad(compute(), w, allow_unused=True)
            grads = [
                torch.zeros_like(p) if g is None else g.detach().double()
                for p, g in zip(w, grads, strict=True)
            ]
            previous = terms[step].get(kind)
            terms[step][kind] = (
                grads if previous is None else [a + b for a, b in zip(previous, grads, strict=True)]
            )
            terms[step].setdefault("weight_" + kind, weight)
        return original(compute, weight, kind)

    trainer._weighted_backward = recording
    return terms


def flat(tensors):
    return torch.cat([t.reshape(-1).double() for t in tensors])


def base_norm_keys(theta):
    return [k for k in theta if k != "lm_head.weight"]  # tied to the embedding: one parameter, counted once


def logs(trainer):
    return [h for h in trainer.state.log_history if "bridge/sft_loss" in h]


def run(tmp_path, make_model, tokenizer, rl_dataset, sft_dataset, peft_config, **overrides):
    trainer = make_trainer(tmp_path, make_model(), tokenizer, rl_dataset, sft_dataset, peft_config=peft_config,
                           **{"max_steps": 2, "per_device_sft_batch_size": 3, **overrides})  # fmt: skip
    snaps = Snapshots(trainer)
    trainer.add_callback(snaps)
    return trainer, snaps


@pytest.mark.parametrize("accumulation", [1, 2])
def test_gain_ratio_and_cosine_match_autograd(
    tmp_path, make_model, tokenizer, rl_dataset, sft_dataset, accumulation
):
    """‖λ(∇L_RL(θ,w) − ∇L_RL(θ̂,w))‖/‖(1−λ)∇L_SFT‖ and the cosine, with 1 and 2 micro-steps (terms summed)."""
    lam = 0.4
    trainer, snaps = run(tmp_path, make_model, tokenizer, rl_dataset, sft_dataset, lora(init_lora_weights=False),
                         bridge_lambda=lam, optim="sgd", learning_rate=0.2, max_grad_norm=0.5,
                         gradient_accumulation_steps=accumulation,
                         per_device_train_batch_size=8 // accumulation)  # fmt: skip
    terms = record_gradients(trainer)
    trainer.train()
    history = logs(trainer)
    assert len(history) == len(terms) == 2
    for step, (h, t) in enumerate(zip(history, terms, strict=True)):
        assert t["weight_sft"] == pytest.approx(1 - lam) and t["weight_rl"] == pytest.approx(lam)
        s = (1 - lam) * flat(t["sft"])
        g = lam * (flat(t["rl"]) - flat(t["shadow"]))
        ratio, cos = (g.norm() / s.norm()).item(), (g @ s / (g.norm() * s.norm())).item()
        if step == 0:  # θ̂ = θ: the two RL gradients agree, the gain term vanishes
            assert ratio < 1e-4 and h["bridge/gain_grad_ratio"] < 1e-4 and h["bridge/shadow_drift"] == 0.0
        else:
            assert ratio > 1e-2  # the step-1 gain term is real, so the comparison can fail
            assert h["bridge/gain_grad_ratio"] == pytest.approx(ratio, rel=1e-4)
            assert h["bridge/gain_grad_cos"] == pytest.approx(cos, abs=1e-4)
        # pre-clip: the clipped update of w (max_grad_norm 0.5) still leaves the logged norms those of S and G
        theta, shadow, _ = snaps.begin[step]
        keys = base_norm_keys(theta)
        drift = flat([theta[k] - shadow[k] for k in keys]).norm() / flat([theta[k] for k in keys]).norm()
        assert h["bridge/shadow_drift"] == pytest.approx(drift.item(), rel=1e-6, abs=1e-12)
    assert history[1]["bridge/shadow_drift"] > 1e-4
    check_updates(history, snaps)


def adapter_share(theta, w, scaling=2.0):
    delta = base = 0.0
    for key, a in w.items():
        if ".lora_A." not in key:
            continue
        b = w[key.replace(".lora_A.", ".lora_B.")]
        delta += (scaling * b.double() @ a.double()).pow(2).sum().item()  # ΔW in full, the plain way
        base += (
            theta[key.removeprefix("base_model.model.").replace(".lora_A", "")].double().pow(2).sum().item()
        )
    return (delta / base) ** 0.5


def check_updates(history, snaps):
    for step, h in enumerate(history):
        (theta0, _, w0), (theta1, _, w1) = snaps.begin[step], snaps.end[step]
        assert h["bridge/adapter_share"] == pytest.approx(adapter_share(theta0, w0), rel=1e-6, abs=1e-12)
        keys = base_norm_keys(theta0)
        expected = flat([theta1[k] - theta0[k] for k in keys]).norm() / flat([theta0[k] for k in keys]).norm()
        assert expected > 1e-6
        assert h["bridge/theta_update"] == pytest.approx(expected.item(), rel=1e-4)
        expected = flat([w1[k] - w0[k] for k in w0]).norm() / flat(w0.values()).norm()
        assert h["bridge/adapter_update"] == pytest.approx(expected.item(), rel=1e-5)


def test_step0_values_and_adamw_updates(tmp_path, make_model, tokenizer, rl_dataset, sft_dataset):
    """The paper's adapter (B = 0): share 0 at step 0, gain and drift 0; AdamW with decoupled decay recovered exactly."""
    trainer, snaps = run(tmp_path, make_model, tokenizer, rl_dataset, sft_dataset, lora(), bridge_lambda=0.5,
                         optim="adamw_torch", weight_decay=0.1, learning_rate=1e-2, adapter_learning_rate=1e-2)  # fmt: skip
    trainer.train()
    history = logs(trainer)
    first = history[0]
    assert first["bridge/adapter_share"] == 0.0 and first["bridge/shadow_drift"] == 0.0
    assert first["bridge/gain_grad_ratio"] < 1e-4
    assert history[1]["bridge/adapter_share"] > 0.0
    check_updates(history, snaps)


def test_mix_with_adapter_logs_adapter_metrics_only(tmp_path, make_model, tokenizer, rl_dataset, sft_dataset):
    trainer, snaps = run(tmp_path, make_model, tokenizer, rl_dataset, sft_dataset, lora(init_lora_weights=False),
                         method="mix", optim="sgd", learning_rate=0.1)  # fmt: skip
    trainer.train()
    history = logs(trainer)
    assert all(k not in h for h in history for k in GAIN_KEYS)
    check_updates(history, snaps)


def test_no_adapter_logs_nothing(tmp_path, make_model, tokenizer, rl_dataset, sft_dataset):
    trainer, _ = run(
        tmp_path, make_model, tokenizer, rl_dataset, sft_dataset, None, method="mix", max_steps=1
    )
    trainer.train()
    assert all(k not in h for h in logs(trainer) for k in GAIN_KEYS + ADAPTER_KEYS)


OPTIMIZERS = [
    (torch.optim.AdamW, dict(lr=0.1, weight_decay=0.3)),
    (torch.optim.AdamW, dict(lr=0.1, weight_decay=0.3, amsgrad=True, foreach=False)),
    (torch.optim.Adam, dict(lr=0.1, weight_decay=0.3)),  # coupled decay
    (torch.optim.Adam, dict(lr=0.1, weight_decay=0.3, decoupled_weight_decay=True, maximize=True)),
    (torch.optim.SGD, dict(lr=0.1, weight_decay=0.3)),
    (torch.optim.SGD, dict(lr=0.1, weight_decay=0.3, momentum=0.9, dampening=0.1)),
    (torch.optim.SGD, dict(lr=0.1, weight_decay=0.3, momentum=0.9, nesterov=True, maximize=True)),
]


@pytest.mark.parametrize("cls,kwargs", OPTIMIZERS)
def test_update_recovered_from_optimizer_state(cls, kwargs):
    """‖Δθ‖² from the state after the step equals an explicit copy's, over three steps."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3, dtype=torch.float64)), torch.nn.Parameter(torch.randn(4))]
    skipped = torch.nn.Parameter(torch.randn(2))  # no gradient: not stepped, not counted
    optimizer = cls([{"params": params}, {"params": [skipped], "lr": 0.5}], **kwargs)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        before = [p.detach().clone() for p in params]
        optimizer.step()
        delta = optimizer_update_square(optimizer, {id(p) for p in params + [skipped]})
        expected = sum((p - b).pow(2).sum().item() for p, b in zip(params, before, strict=True))
        assert delta == pytest.approx(expected, rel=1e-5)


def test_unknown_optimizer_is_not_guessed():
    p = torch.nn.Parameter(torch.randn(3))
    optimizer = torch.optim.Adagrad([p], lr=0.1)
    p.grad = torch.ones(3)
    optimizer.step()
    assert optimizer_update_square(optimizer, {id(p)}) is None


# -- several processes: the same values as one process with the same global batch (`tests/scripts/run_bridge.py`)
from .test_distributed import launch, saved_model  # noqa: E402, F401  (the fixture, reused)

SHARED_KEYS = ("bridge/shadow_drift", "bridge/adapter_share", "bridge/adapter_update")


def assert_diagnostics_match(one_logs, two_logs, keys):
    assert len(one_logs) == len(two_logs) == 2
    for h1, h2 in zip(one_logs, two_logs, strict=True):
        for key in keys:
            assert h2[key] == pytest.approx(h1[key], rel=1e-4, abs=1e-6), key
    assert one_logs[1]["bridge/shadow_drift"] > 1e-4 and one_logs[1]["bridge/adapter_share"] > 0


@pytest.fixture(scope="module")
def one_process_ga1(tmp_path_factory, saved_model):  # noqa: F811
    return launch(tmp_path_factory.mktemp("one") / "out", **saved_model)[1]


@pytest.mark.distributed
def test_ddp_with_accumulation_matches_one_process(one_process_ga1, saved_model, tmp_path):  # noqa: F811
    """DDP averages S + G over the ranks; S is averaged the same way, over 2 micro-steps per rank."""
    two = launch(tmp_path / "two", "ddp", BRIDGE_TEST_GA="2", **saved_model)[1]
    assert_diagnostics_match(one_process_ga1, two, SHARED_KEYS + ("bridge/theta_update",))
    h1, h2 = one_process_ga1[1], two[1]  # step 1: θ̂ ≠ θ, a real gain term (step 0's cosine is rounding noise)
    assert h1["bridge/gain_grad_ratio"] > 1e-2
    for key in ("bridge/gain_grad_ratio", "bridge/gain_grad_cos"):
        assert h2[key] == pytest.approx(h1[key], rel=1e-4, abs=1e-5), key


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_zero_matches_one_process(one_process_ga1, saved_model, tmp_path, stage):  # noqa: F811
    """Under ZeRO-3 θ, θ̂ and the base weights are sharded: their squares are summed over the ranks."""
    two = launch(tmp_path / stage, stage, **saved_model)[1]
    assert_diagnostics_match(one_process_ga1, two, SHARED_KEYS)
    assert all(k not in h for h in two for k in ("bridge/gain_grad_ratio", "bridge/theta_update"))
