"""The model card (`bridge_trl.card`): the method run, the base model, the data, and a snippet that loads π(θ, w)."""

import re
from types import SimpleNamespace

import pytest
import torch
import transformers.trainer
from datasets import Dataset

from bridge_trl import BridgeTrainer
from bridge_trl.card import METHOD_CARDS

from .conftest import toy_reward
from .helpers import make_config

PAPERS = {
    "bridge": "2509.06948",
    "chord": "2508.11408",
    "luffy": "2504.14945",
    "rl": "2402.03300",
    "hpt": "2509.04419",
    "relift": "2506.07527",
}


def build(tmp_path, model, tokenizer, rl, sft, **overrides):
    return BridgeTrainer(model, toy_reward, args=make_config(tmp_path, **overrides), train_dataset=rl,
                         sft_dataset=sft, processing_class=tokenizer)  # fmt: skip


def snippet(card: str) -> str:
    return re.search(r"```python\n(.*?)```", card, re.S).group(1)


def policy_logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer(["12+30=", "7+8=9"], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**ids).logits.float()


@pytest.mark.parametrize("method", list(METHOD_CARDS))
def test_card_names_the_method_run(tmp_path, make_model, tokenizer, rl_dataset, sft_dataset, method):
    extra = {"loss_type": "dapo"} if method == "luffy" else {}
    trainer = build(tmp_path, make_model(), tokenizer, rl_dataset, sft_dataset, method=method, **extra)
    trainer.create_model_card(dataset_name=["org/limr-prompts", str(tmp_path / "traces.jsonl")])
    trainer.save_model()
    card = (tmp_path / "out" / "README.md").read_text()
    what, paper, _ = METHOD_CARDS[method]
    assert f"This model was trained with {what}" in card
    assert "None" not in card.split("## Citations")[0]  # no "[None](https://huggingface.co/None)"
    assert (
        "fine-tuned version of a local model on [org/limr-prompts](https://huggingface.co/datasets/org/"
        in card
    )
    assert "`traces.jsonl` (local)" in card and "datasets/" + str(tmp_path) not in card
    if method in PAPERS:
        assert f"https://huggingface.co/papers/{PAPERS[method]}" in card
        assert f"eprint       = {{arXiv:{PAPERS[method]}}}" in card
    else:  # a baseline of BRIDGE, compared in its paper, claims no paper of its own
        assert "baseline of BRIDGE" in what and "as compared in [Beyond Two-Stage Training" in card
    assert ("`bridge_lambda`" in card) == (method in ("bridge", "mix"))
    assert (
        "LoRA rank r / alpha / target modules | 16 / 16 / down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"
        in card
    ) == (method == "bridge")
    assert ('subfolder="adapter"' in snippet(card)) == (method == "bridge")
    assert f'from_pretrained("{tmp_path / "out"}")' in snippet(card)
    assert "base_model:" not in card.split("---")[1]  # a local base has no Hub id to link


@pytest.mark.parametrize(("method", "merged"), [("bridge", False), ("bridge", True), ("rl", False)])
def test_card_snippet_reloads_the_trained_policy(tmp_path, make_model, tokenizer, rl_dataset, sft_dataset, method,
                                                  merged):  # fmt: skip
    trainer = build(
        tmp_path, make_model(), tokenizer, rl_dataset, sft_dataset, method=method, save_merged=merged
    )
    before = policy_logits(trainer.model, tokenizer)
    trainer.train()
    trainer.save_model()
    trainer.model.eval()
    trained = policy_logits(trainer.model, tokenizer)
    assert (trained - before).abs().max() > 1e-4  # the step moved the policy
    code = snippet((tmp_path / "out" / "README.md").read_text())
    assert ('subfolder="merged"' in code) == merged
    scope = {}
    exec(code, scope)  # as a user would paste it: loads, generates, prints
    torch.testing.assert_close(policy_logits(scope["model"].eval(), tokenizer), trained, atol=1e-5, rtol=1e-5)


def test_card_links_a_hub_base_model(tmp_path, make_model, tokenizer, rl_dataset, sft_dataset):
    model = make_model()
    model.config._name_or_path = "Qwen/Qwen2.5-3B"
    trainer = build(tmp_path, model, tokenizer, rl_dataset, sft_dataset, method="mix")
    trainer.save_model()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "fine-tuned version of [Qwen/Qwen2.5-3B](https://huggingface.co/Qwen/Qwen2.5-3B)" in card
    assert "base_model: Qwen/Qwen2.5-3B" in card


def test_checkpoints_write_the_card(tmp_path, make_model, tokenizer, rl_dataset, sft_dataset):
    trainer = build(tmp_path, make_model(), tokenizer, rl_dataset, sft_dataset, method="sft",
                    save_strategy="steps", save_steps=1)  # fmt: skip
    trainer.train()
    for folder in (tmp_path / "out", tmp_path / "out" / "checkpoint-1"):
        assert "This model was trained with SFT alone" in (folder / "README.md").read_text()


def test_push_to_hub_uploads_theta_adapter_and_card(tmp_path, make_model, tokenizer, rl_dataset, sft_dataset,
                                                    monkeypatch):  # fmt: skip
    """`push_to_hub()` with the Hub client intercepted: no network, the uploaded folder is inspected."""
    uploads = []

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            return SimpleNamespace(repo_id=repo_id)

        def upload_folder(self, repo_id, folder_path, **kwargs):
            from pathlib import Path

            files = {str(p.relative_to(folder_path)): p.read_bytes() for p in Path(folder_path).rglob("*")
                     if p.is_file()}  # fmt: skip
            uploads.append((repo_id, files, kwargs.get("ignore_patterns")))
            return SimpleNamespace(commit_url="fake")

    monkeypatch.setattr(transformers.trainer, "hf_api", lambda *a, **k: FakeApi())
    data = Dataset.from_dict({"prompt": rl_dataset["prompt"][:8], "answer": rl_dataset["answer"][:8]})
    trainer = build(tmp_path, make_model(), tokenizer, data, sft_dataset, push_to_hub=True,
                    hub_model_id="someone/tiny-bridge")  # fmt: skip
    trainer.push_to_hub(dataset_name="someone/sums")
    repo, files, _ = uploads[-1]
    assert repo == "someone/tiny-bridge"
    assert {"model.safetensors", "config.json", "adapter/adapter_model.safetensors", "README.md"} <= set(
        files
    )
    card = files["README.md"].decode()
    assert "This model was trained with BRIDGE" in card and "# Model Card for tiny-bridge" in card
    assert 'PeftModel.from_pretrained(model, "someone/tiny-bridge", subfolder="adapter")' in card
    assert "[someone/sums](https://huggingface.co/datasets/someone/sums)" in card
