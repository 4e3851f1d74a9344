"""HF generation samples π(θ, w) from merged weights and leaves θ exactly as it was (`bridge_trl.merged_generation`)."""

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.layer import Linear as LoraLinear

from bridge_trl.merged_generation import adapter_merged

from .helpers import assert_dicts_close, make_trainer, snapshot


def lora():
    return LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)


def test_merged_forward_is_the_policy_and_theta_is_restored_bitwise(make_model, tokenizer):
    model = get_peft_model(make_model(), lora())
    ids = torch.tensor([tokenizer("12+34=")["input_ids"]])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        with adapter_merged(model):
            layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
            assert layers and all(m.merged for m in layers)
            merged = model(input_ids=ids).logits
            # The merged weight is W + s·BA (computed here by hand for one layer).
            m = layers[0]
            w = before[next(k for k in before if k.endswith(".base_layer.weight"))]
            delta = m.lora_B["default"].weight @ m.lora_A["default"].weight * m.scaling["default"]
            torch.testing.assert_close(m.get_base_layer().weight, w + delta)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    assert not any(m.merged for m in layers)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # bit for bit: restored from the copy, not by subtracting ΔW


def test_bridge_generates_from_merged_weights_and_trains_the_same(
    tmp_path, make_model, tokenizer, rl_dataset, sft_dataset
):
    """Generation sees merged layers, the training passes unmerged ones; θ, θ̂, w match a run without merging."""
    states = []
    for merge in (True, False):
        trainer = make_trainer(tmp_path / str(merge), make_model(), tokenizer, rl_dataset, sft_dataset,
                               peft_config=lora(), max_steps=2, learning_rate=1e-2,
                               merge_adapter_for_generation=merge)  # fmt: skip
        layer = next(m for m in trainer.model.modules() if isinstance(m, LoraLinear))
        seen = {"generation": set(), "training": set()}

        def record(module, _, seen=seen):
            seen["training" if torch.is_grad_enabled() else "generation"].add(module.merged)

        layer.register_forward_pre_hook(record)
        trainer.train()
        assert seen["generation"] == {merge}, seen
        assert seen["training"] == {False}, seen
        states.append(snapshot(trainer))
    for a, b in zip(*states, strict=True):
        assert_dicts_close(a, b, atol=1e-6, rtol=1e-5)
