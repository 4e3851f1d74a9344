"""LUFFY with the real vLLM engine (`make test-vllm`): trace rows and generated rows are scored and trained as
without vLLM.

Run A trains `method="luffy"` for 2 SGD steps with vLLM colocated (float32 engine) and records what vLLM generated,
before LUFFY put the traces in. Run B is the same trainer without vLLM, its generation replaced by a replay of A's
completions (at GRPOTrainer's generation hook, below LUFFY's substitution). Both must then see the same rows, the
same off-policy flags and advantages, and end at the same θ; what vLLM adds on the generated rows, its
importance-sampling ratio, is π(θ)/μ ≈ 1 with a float32 engine, and trace rows carry no vLLM log-prob at all.
"""

import pytest
import torch
from trl import GRPOTrainer

from bridge_trl.luffy import OFF_POLICY_KEY

from .helpers import assert_dicts_close, diff, make_trainer, max_abs
from .vllm_cpu import (
    StateSnapshots,
    hf_policy,
    hf_token_logprobs,
    logprob_tolerance,
    requires_vllm,
    rl_and_sft_datasets,
    save_tiny_model,
    setup_process,
    vllm_trainer_kwargs,
)

pytestmark = [pytest.mark.vllm, requires_vllm]
COMMON = dict(method="luffy", max_steps=2, optim="sgd", learning_rate=0.05, luffy_num_off_policy=1)


def luffy_run(root, path, tokenizer, monkeypatch, generate, **overrides):
    rl, sft = rl_and_sft_datasets(traces_for_every_prompt=True)
    monkeypatch.setattr(GRPOTrainer, "_generate_single_turn", generate)
    trainer = make_trainer(root, path, tokenizer, rl, sft, **COMMON, **overrides)
    states, batches, compute_loss = StateSnapshots(trainer), [], trainer._compute_loss

    def recording(model, inputs):
        batches.append(dict(inputs))
        return compute_loss(model, inputs)

    trainer._compute_loss = recording
    trainer.train()
    return trainer, states, batches


def row_keys(inputs):
    for row in range(len(inputs["prompt_ids"])):
        prompt = inputs["prompt_ids"][row][inputs["prompt_mask"][row].bool()]
        completion = inputs["completion_ids"][row][inputs["completion_mask"][row].bool()]
        yield tuple(prompt.tolist()), tuple(completion.tolist())


def test_luffy_rows_scored_and_trained_as_without_vllm(tmp_path, tokenizer, monkeypatch):
    setup_process()
    path = save_tiny_model(tmp_path / "tiny")
    generated, vllm_generate = [], GRPOTrainer._generate_single_turn

    def recording(self, prompt_ids, *args, **kwargs):
        completion_ids, logprobs = vllm_generate(self, prompt_ids, *args, **kwargs)
        assert logprobs is not None  # vLLM's sampling log-probs
        generated.append(([list(p) for p in prompt_ids], [list(c) for c in completion_ids]))
        return completion_ids, logprobs

    a, a_states, a_batches = luffy_run(tmp_path / "a", path, tokenizer, monkeypatch, recording,
                                       **vllm_trainer_kwargs())  # fmt: skip
    replay = list(generated)

    def replaying(self, prompt_ids, *args, **kwargs):
        prompts, completions = replay.pop(0)
        assert [list(p) for p in prompt_ids] == prompts  # the same prompts in the same order
        return completions, None

    b, b_states, b_batches = luffy_run(tmp_path / "b", path, tokenizer, monkeypatch, replaying, use_cpu=True)
    assert len(generated) == 2 and not replay

    tol = logprob_tolerance()
    traces = a.luffy
    assert len(a_batches) == len(b_batches) == 2
    for k, (x, y) in enumerate(zip(a_batches, b_batches, strict=True)):
        # GRPO shuffles the generation batch (torch's RNG, which the engine's start also draws from): align B's
        # rows with A's by their prompt and completion tokens.
        b_rows = {}
        for row, key in enumerate(row_keys(y)):
            b_rows.setdefault(key, []).append(row)
        order = torch.tensor([b_rows[key].pop(0) for key in row_keys(x)])
        off = x[OFF_POLICY_KEY]
        assert torch.equal(off, y[OFF_POLICY_KEY][order]) and off.any() and not off.all()
        assert off.sum() == len(off) // 4  # one trace per group of 4
        torch.testing.assert_close(x["advantages"], y["advantages"][order], atol=1e-6, rtol=0)
        assert x["advantages"][off].abs().max() > 1e-3  # the trace rows carry a learning signal
        model = hf_policy(path, a_states.steps[k]["theta"])
        vllm_completions = generated[k][1]
        for row in range(len(off)):
            prompt = x["prompt_ids"][row][x["prompt_mask"][row].bool()].tolist()
            mask = x["completion_mask"][row].bool()
            completion = x["completion_ids"][row][mask].tolist()
            sampled = x["sampling_per_token_logps"][row][mask].double()
            if off[row]:  # the prompt's trace, as the SFT tokenization gives it; vLLM never scored it
                assert completion in traces.lookup(prompt)
                assert completion not in vllm_completions
                assert torch.isnan(sampled).all()
            else:  # vLLM's own completion, and its own log-probs, which are π(θᵏ)'s
                assert completion in vllm_completions
                torch.testing.assert_close(
                    sampled, hf_token_logprobs(model, prompt, completion), atol=tol, rtol=0
                )
        assert (x["importance_sampling_ratio"] - 1).abs().max() < 1e-4  # TRL's default sequence_mask, C_max 3
    # Trained alike: the same θ after both steps, and θ really moved.
    assert_dicts_close(a_states.final["theta"], b_states.final["theta"], atol=1e-5, rtol=1e-4)
    assert max_abs(diff(a_states.final["theta"], a_states.steps[0]["theta"])) > 1e-3
    a_logs, b_logs = ([h for h in t.state.log_history if "loss" in h] for t in (a, b))
    for key in ("loss", "luffy/off_policy_prob", "luffy/trace_group_fraction"):
        assert [h[key] for h in a_logs] == pytest.approx([h[key] for h in b_logs], abs=1e-5), key
