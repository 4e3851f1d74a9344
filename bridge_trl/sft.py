"""The SFT side of BRIDGE: validating and tokenizing `sft_dataset`, sampling it per step, and L_SFT.

L_SFT = −J_SFT (Eq. 1) is the mean token negative log-likelihood of the completion (reasoning trace + answer) plus
its end-of-sequence token, prompt tokens masked. The mean runs over every completion token of the optimizer step's
SFT batch (all micro-batches, all ranks), so the gradient does not depend on how the batch is split by gradient
accumulation or across processes.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from datasets import Dataset, IterableDataset
from trl.data_utils import is_conversational

from .chord import phi_weights

TokenizePrompts = Callable[[list], tuple]


def _has_text(content) -> bool:
    if isinstance(content, str):
        return bool(content.strip())
    if isinstance(content, list):  # a list of messages, or of content blocks
        return any(_has_text(m.get("content", m.get("text")) if isinstance(m, dict) else m) for m in content)
    return False


def _to_prompt_completion(example: dict, index: int) -> tuple:
    """(prompt, completion) of one SFT row in any of TRL's SFT formats, or a ValueError naming the row."""
    if "messages" in example:
        messages = example["messages"]
        if not messages or messages[-1].get("role") != "assistant":
            raise ValueError(f"Row {index} of `sft_dataset`: `messages` must end with an assistant message.")
        prompt, completion = messages[:-1], messages[-1:]
    else:
        prompt, completion = example["prompt"], example["completion"]
    if not _has_text(completion):
        raise ValueError(f"Row {index} of `sft_dataset` has an empty completion (reasoning trace).")
    if not _has_text(prompt):
        raise ValueError(f"Row {index} of `sft_dataset` has an empty prompt.")
    return prompt, completion


def normalize_question(text: str) -> str:
    """A key under which the same problem from two datasets compares equal: case, spacing, `$` and
    fraction-macro spelling ignored."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = re.sub(r"\\[dt]frac", r"\\frac", text).replace("$", "")
    return re.sub(r"\s+", "", text).rstrip(".")


def validate_sft_dataset(dataset, method: str = "bridge") -> None:
    """Fail before training, naming the problem: missing dataset, wrong type, empty, missing column."""
    if dataset is None:
        raise ValueError(
            f"`sft_dataset` is required: method={method!r} trains on (prompt, reasoning trace) pairs"
            f"{'' if method == 'sft' else ' as well as RL'}. Only method='rl' trains without one."
        )
    if isinstance(dataset, IterableDataset) or not isinstance(dataset, Dataset):
        raise TypeError(
            f"`sft_dataset` must be a map-style `datasets.Dataset` (got {type(dataset).__name__}); its position is "
            "derived from the step, so that checkpoints resume exactly."
        )
    if len(dataset) == 0:
        raise ValueError("`sft_dataset` is empty.")
    columns = set(dataset.column_names)
    if "messages" not in columns:
        for name in ("prompt", "completion"):
            if name not in columns:
                raise ValueError(
                    f"`sft_dataset` has no `{name}` column; expected `prompt`/`completion` or `messages`. "
                    f"Columns present: {sorted(columns)}."
                )


def tokenize_sft_dataset(
    dataset: Dataset,
    tokenize_prompts: TokenizePrompts,
    tokenizer,
    eos_token_ids: Sequence[int],
    chat_template: str | None = None,
    chat_template_kwargs: dict | None = None,
    max_length: int | None = None,
) -> Dataset:
    """Tokenize `dataset` into `prompt_ids`/`completion_ids`, with prompts rendered exactly as RL prompts are.

    `tokenize_prompts` is the GRPO trainer's own prompt tokenizer, so both objectives see the same template. A
    conversational completion is the chat template's rendering of the assistant turn, cut after its end-of-turn
    token (the token that stops generation); a plain-text completion gets the tokenizer's EOS appended.
    """
    validate_sft_dataset(dataset)
    chat_template_kwargs = chat_template_kwargs or {}
    eos = tokenizer.eos_token_id

    def render(batch: dict, indices: list[int]) -> dict:
        rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
        pairs = [_to_prompt_completion(row, i) for row, i in zip(rows, indices, strict=True)]
        prompt_ids = tokenize_prompts([p for p, _ in pairs])[0]
        out = {"prompt_ids": [], "completion_ids": [], "num_completion_tokens": []}
        for (prompt, completion), p_ids, index in zip(pairs, prompt_ids, indices, strict=True):
            if is_conversational({"prompt": prompt}):
                kwargs = dict(chat_template=chat_template, tokenize=False, **chat_template_kwargs)
                prefix = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, **kwargs)
                full = tokenizer.apply_chat_template(prompt + completion, **kwargs)
                if not full.startswith(prefix):
                    raise ValueError(
                        f"Row {index} of `sft_dataset`: the chat template does not extend the prompt."
                    )
                c_ids = tokenizer(full[len(prefix) :], add_special_tokens=False)["input_ids"]
                ends = [j for j, t in enumerate(c_ids) if t in eos_token_ids]
                c_ids = c_ids[: ends[-1] + 1] if ends else [*c_ids, eos]
            else:
                c_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [eos]
            p_ids = list(p_ids)
            if max_length is not None:
                if len(p_ids) >= max_length:
                    raise ValueError(
                        f"Row {index} of `sft_dataset`: the prompt alone has {len(p_ids)} tokens, at least "
                        f"`max_sft_length`={max_length}."
                    )
                c_ids = c_ids[: max_length - len(p_ids)]
            out["prompt_ids"].append(p_ids)
            out["completion_ids"].append(c_ids)
            out["num_completion_tokens"].append(len(c_ids))
        return out

    return dataset.map(
        render,
        batched=True,
        with_indices=True,
        remove_columns=dataset.column_names,
        desc="Tokenizing SFT dataset",
    )


class SFTSampler:
    """Stateless, seeded order over the SFT dataset: position j ↦ example index, epoch after epoch.

    Each epoch is a fresh permutation drawn from `seed + epoch`, so the sample for any position is a pure function
    of the position: a resumed run draws exactly what an uninterrupted one would.
    """

    def __init__(self, num_examples: int, seed: int):
        self.n, self.seed = num_examples, seed
        self._epoch, self._perm = -1, None

    def __getitem__(self, position: int) -> int:
        epoch, offset = divmod(position, self.n)
        if epoch != self._epoch:
            self._perm = torch.randperm(
                self.n, generator=torch.Generator().manual_seed(self.seed + epoch)
            ).tolist()
            self._epoch = epoch
        return self._perm[offset]


@dataclass
class SFTBatch:
    input_ids: torch.Tensor  # (B, P + C): prompts left-padded to P, completions right-padded to C
    attention_mask: torch.Tensor  # (B, P + C)
    completion_mask: torch.Tensor  # (B, C): 1 on completion tokens (trace + answer + EOS)
    normalizer: float  # completion tokens of the whole step's SFT batch / number of processes


def collate(examples: list[dict], pad_token_id: int, normalizer: float, device) -> SFTBatch:
    """Left-pad prompts and right-pad completions, so the completion region is the last C positions."""
    p_len = max(len(e["prompt_ids"]) for e in examples)
    c_len = max(len(e["completion_ids"]) for e in examples)
    ids, attn, cmask = [], [], []
    for e in examples:
        p, c = e["prompt_ids"], e["completion_ids"]
        left, right = p_len - len(p), c_len - len(c)
        ids.append([pad_token_id] * left + p + c + [pad_token_id] * right)
        attn.append([0] * left + [1] * (len(p) + len(c)) + [0] * right)
        cmask.append([1] * len(c) + [0] * right)
    as_tensor = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
    return SFTBatch(as_tensor(ids), as_tensor(attn), as_tensor(cmask), normalizer)


def sft_loss(model, batch: SFTBatch, fused_lm_head: bool, phi: bool = False) -> torch.Tensor:
    """This micro-batch's share of the step's L_SFT: Σ token NLL / `batch.normalizer`.

    With `phi` (CHORD), each token's NLL is weighted by φ = p(1 − p), detached (`bridge_trl.chord.phi_weights`);
    the normaliser is still the step's token count.

    With `fused_lm_head` the model was patched by TRL's `add_fused_lm_head` at temperature 1 and returns per-token
    log-probabilities without materialising (B, L, V) logits. Otherwise only the last C + 1 positions' logits are
    computed (`logits_to_keep`), as GRPO does for completions.
    """
    c_len = batch.completion_mask.size(1)
    if fused_lm_head:
        labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
        labels[:, :-c_len] = -100
        out = model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels, fused_lm_head=True
        )
        token_logps = out.log_probs[:, -c_len:]  # (B, C), zero where masked
    else:
        logits = model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, logits_to_keep=c_len + 1
        ).logits[:, :-1]  # (B, C, V): position t predicts completion token t
        targets = batch.input_ids[:, -c_len:]
        token_logps = -F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")
    weights = batch.completion_mask * phi_weights(token_logps) if phi else batch.completion_mask  # (B, C)
    nll = -(token_logps * weights).sum()
    return nll / batch.normalizer


class SFTStream:
    """The SFT batches of a run: which examples each (step, micro-batch, rank) trains on, and their normaliser.

    A step's global SFT batch is `per_device × accumulation × world` consecutive sampler positions; micro-batch i
    of rank r takes its slice `i * world + r`. Everything is a function of the step, so a resumed run and an
    uninterrupted one train on the same examples, and one process sees what two processes see together.
    """

    def __init__(self, dataset: Dataset, seed: int, per_device: int, accumulation: int, pad_token_id: int):
        self.dataset, self.per_device, self.accumulation, self.pad_token_id = (
            dataset,
            per_device,
            accumulation,
            pad_token_id,
        )
        self.sampler = SFTSampler(len(dataset), seed)
        self.num_tokens = torch.tensor(dataset["num_completion_tokens"], dtype=torch.long)
        # Batched reads of just the token columns: ~0.1 ms a micro-batch, against ~2 ms for `select` + rows.
        self._tokens = dataset.select_columns(["prompt_ids", "completion_ids"])

    def step_positions(self, step: int, world: int, micro_steps: int | None = None) -> range:
        """Sampler positions the step trains on: its first `micro_steps` micro-batches (default: all) of all ranks.

        A step's slot always spans `accumulation` micro-batches, so positions stay a function of the step; the
        Trainer runs fewer micro-batches on an epoch's short last step, and only those count.
        """
        size = self.per_device * self.accumulation * world
        used = self.per_device * min(micro_steps or self.accumulation, self.accumulation) * world
        return range(step * size, step * size + used)

    def step_tokens(self, step: int, world: int, micro_steps: int | None = None) -> int:
        """Completion tokens of the step's global SFT batch (the micro-batches that run)."""
        positions = self.step_positions(step, world, micro_steps)
        return self.num_tokens[[self.sampler[j] for j in positions]].sum().item()

    def micro_batch(
        self, step: int, micro: int, world: int, rank: int, device, micro_steps: int | None = None
    ) -> SFTBatch:
        first = self.step_positions(step, world).start + (micro * world + rank) * self.per_device
        columns = self._tokens[[self.sampler[j] for j in range(first, first + self.per_device)]]
        pairs = zip(columns["prompt_ids"], columns["completion_ids"], strict=True)
        rows = [{"prompt_ids": p, "completion_ids": c} for p, c in pairs]
        # Normalise by the tokens of the whole step (the micro-batches that run, all ranks), divided by the number
        # of ranks because their gradients are averaged: Σ_step NLL / N_step, however the batch is split.
        tokens = self.step_tokens(step, world, micro_steps)
        return collate(rows, self.pad_token_id, max(tokens, 1) / world, device)


def build_sft_stream(trainer, sft_dataset) -> tuple[Dataset | None, SFTStream | None]:
    """`trainer`'s tokenized SFT set and its per-step stream; (None, None) for a method that trains on RL alone."""
    if sft_dataset is None:
        return None, None
    args = trainer.args
    tokenized = tokenize_sft_dataset(
        sft_dataset, trainer._tokenize_prompts, trainer._tokenizer, trainer.eos_token_ids, trainer.chat_template,
        trainer.chat_template_kwargs, args.max_sft_length,
    )  # fmt: skip
    stream = SFTStream(tokenized, args.seed, args.per_device_sft_batch_size, args.gradient_accumulation_steps,
                       trainer._tokenizer.pad_token_id)  # fmt: skip
    return tokenized, stream
