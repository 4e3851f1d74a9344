"""The weights synced to vLLM are π(θ, w), computed out of place (`bridge_trl.vllm_sync`).

vLLM is not needed except by the GPU test: TRL's real `VLLMGeneration.sync_weights` is driven with a recording
stand-in for the vLLM engine, built without `__init__` (which would start vLLM).
"""

import functools
import importlib.util
import math
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from peft import LoraConfig, get_peft_model
from trl.distributed import DistributedBackend
from trl.generation.vllm_generation import VLLMGeneration

from bridge_trl.vllm_sync import install_vllm_sync, iter_policy_weights

from .helpers import make_trainer

IDS = torch.tensor([[5, 17, 99, 200, 3, 42, 7, 250], [1, 2, 3, 4, 5, 6, 7, 8]])


def lora_config(**kwargs) -> LoraConfig:
    # init_lora_weights=False: B is random too, so ΔW ≠ 0 and a sync that drops it gives other logits.
    return LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, **kwargs)


@pytest.fixture
def peft_model(make_model):
    return get_peft_model(make_model(), lora_config()).eval()


def policy_weights(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in iter_policy_weights(model):
        assert name not in out, f"{name} yielded twice"
        out[name] = tensor.detach().clone()
    return out


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def assert_same_policy(weights: dict[str, torch.Tensor], peft_model, make_model) -> None:
    """Load `weights` into a fresh plain model (other random init); its logits must be the PeftModel's."""
    fresh = make_model(seed=1).eval()
    missing, unexpected = fresh.load_state_dict(weights, strict=False)
    assert unexpected == [] and missing == ["lm_head.weight"]  # tied to the embedding, which was loaded
    assert fresh.lm_head.weight.data_ptr() == fresh.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(logits(fresh), logits(peft_model), atol=1e-5, rtol=0)


def recording_vllm_generation():
    """A VLLMGeneration with what `sync_weights` reads in colocate mode, and an engine that records loads."""
    runner_model = SimpleNamespace(loaded=[], calls=0, resets=0)

    def load_weights(weights):
        runner_model.calls += 1
        runner_model.loaded.extend((name, tensor.detach().clone()) for name, tensor in weights)

    def reset_prefix_cache():
        runner_model.resets += 1

    runner_model.load_weights = load_weights
    executor = SimpleNamespace(
        driver_worker=SimpleNamespace(model_runner=SimpleNamespace(model=runner_model))
    )
    obj = VLLMGeneration.__new__(VLLMGeneration)
    obj.mode, obj.enable_sleep_mode = "colocate", False
    obj.accelerator = Accelerator(cpu=True)  # read (into a local) even in colocate mode
    obj.llm = SimpleNamespace(
        llm_engine=SimpleNamespace(model_executor=executor), reset_prefix_cache=reset_prefix_cache
    )
    return obj, runner_model


def test_names_match_plain_state_dict_and_trl(peft_model, make_model):
    names = [name for name, _ in iter_policy_weights(peft_model)]
    assert len(names) == len(set(names))
    plain = make_model().state_dict()
    assert "lm_head.weight" in plain  # tied: a state_dict key, but not a separate parameter
    assert set(names) == set(plain) - {"lm_head.weight"}
    # TRL's own PEFT iterator (merge in place, then strip names) yields the same names in the same order.
    obj = VLLMGeneration.__new__(VLLMGeneration)
    obj.model, obj._dist = peft_model, DistributedBackend(Accelerator(cpu=True))
    assert [name for name, _ in obj._iter_named_params()] == names
    # A model without an adapter: its parameters as they are.
    plain_model = make_model()
    pairs, params = list(iter_policy_weights(plain_model)), list(plain_model.named_parameters())
    assert [n for n, _ in pairs] == [n for n, _ in params]
    assert all(t.data_ptr() == p.data_ptr() for (_, t), (_, p) in zip(pairs, params, strict=True))


def test_synced_weights_are_the_policy(peft_model, make_model):
    weights = policy_weights(peft_model)
    assert_same_policy(weights, peft_model, make_model)
    with peft_model.disable_adapter():  # ΔW matters: θ alone is another policy, which the check would reject
        base_logits = logits(peft_model)
    assert (base_logits - logits(peft_model)).abs().max() > 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_parameter_is_modified(make_model, dtype):
    model = get_peft_model(make_model().to(dtype), lora_config())
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    weights = policy_weights(model)
    assert all(t.dtype == dtype for t in weights.values())
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
        assert p.grad is None


def test_trl_in_place_merge_perturbs_bf16_base(make_model):
    """Why we replace TRL's iterator: its merge/unmerge round trip changes a trained bf16 θ at every sync."""
    model = get_peft_model(make_model().to(torch.bfloat16), lora_config())
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    obj = VLLMGeneration.__new__(VLLMGeneration)
    obj.model, obj._dist = model, DistributedBackend(Accelerator(cpu=True))
    for _ in obj._iter_named_params():
        pass
    changed = [name for name, p in model.named_parameters() if not torch.equal(p, before[name])]
    assert changed and all(".base_layer." in name for name in changed)


def test_trl_sync_weights_sends_the_policy(peft_model, make_model):
    obj, runner_model = recording_vllm_generation()
    install_vllm_sync(obj, peft_model)
    obj.sync_weights()
    expected = policy_weights(peft_model)
    assert [name for name, _ in runner_model.loaded] == list(expected)
    assert (
        runner_model.calls == len(expected) and runner_model.resets == 1
    )  # one tensor per load_weights call
    for name, tensor in runner_model.loaded:
        assert torch.equal(tensor, expected[name]), name
    assert_same_policy(dict(runner_model.loaded), peft_model, make_model)


@pytest.mark.filterwarnings("ignore:`lora_bias=True` was passed")  # o_proj and the MLP have no bias
@pytest.mark.parametrize("kwargs", [{"use_dora": True}, {"lora_bias": True}])
def test_unsupported_lora_is_refused(make_model, kwargs):
    model = get_peft_model(make_model(), lora_config(**kwargs))
    with pytest.raises(NotImplementedError):
        policy_weights(model)


@pytest.mark.gpu
def test_colocate_generation_gpu(tmp_path, make_model, tokenizer, rl_dataset, sft_dataset, monkeypatch):
    if not torch.cuda.is_available() or importlib.util.find_spec("vllm") is None:
        pytest.skip("needs a CUDA GPU and vLLM")
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process, as TRL reads it
    path = tmp_path / "tiny"
    # Head size 64 for vLLM's attention kernels; saved in bf16, so vLLM runs in bf16 (the trainer loads fp32).
    model = make_model(hidden_size=128, num_attention_heads=2, num_key_value_heads=1)
    model.to(torch.bfloat16).save_pretrained(path)
    tokenizer.save_pretrained(path)
    trainer = make_trainer(tmp_path, str(path), tokenizer, rl_dataset, sft_dataset, peft_config=lora_config(),
                           max_steps=2, use_vllm=True, vllm_mode="colocate", vllm_gpu_memory_utilization=0.3,
                           vllm_max_model_length=256, use_cpu=False, bf16=True)  # fmt: skip
    vg = trainer.vllm_generation
    installed = vg._iter_named_params
    assert isinstance(installed, functools.partial) and installed.func is iter_policy_weights
    assert installed.args == (trainer.model,)
    runner = vg.llm.llm_engine.model_executor.driver_worker.model_runner.model
    load_weights, loaded = runner.load_weights, {}

    def recording(weights):
        weights = list(weights)
        loaded.update((name, tensor.detach().to("cpu", copy=True)) for name, tensor in weights)
        return load_weights(weights)

    runner.load_weights = recording
    trainer.train()
    rl_losses = [h["bridge/rl_loss"] for h in trainer.state.log_history if "bridge/rl_loss" in h]
    assert len(rl_losses) == 2 and all(math.isfinite(x) for x in rl_losses)
    assert loaded  # synced during training
    vg.sync_weights()  # once more, so that vLLM holds the final π(θ, w)
    expected = {name: t.detach().to("cpu", copy=True) for name, t in iter_policy_weights(trainer.model)}
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[name], expected[name]) for name in expected)
    name = "model.layers.0.self_attn.o_proj.weight"  # not stacked by vLLM, LoRA-wrapped here
    held = dict(runner.named_parameters())[name]
    assert torch.equal(held.cpu(), expected[name].to(held.dtype))
    theta = trainer.model.get_base_model().model.layers[0].self_attn.o_proj.base_layer.weight
    assert not torch.equal(theta.detach().cpu(), expected[name])  # ΔW ≠ 0 reached vLLM
