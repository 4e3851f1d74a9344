"""The toy base model: a tiny Qwen2 pretrained on `pretraining_corpus` until its validation accuracy is in a band.

The demo, `--check` and `--sweep` load the base that ships with the package (`shipped_base()`, `shipped_base/`
beside this file, checked against `SHIPPED_BASE_SHA256`): the learning rates in `tuned.json` and the checks in
`CALIBRATION.md` were measured on exactly those weights. Pretraining is chaotic across CPUs (the same settings
stopped at 22.8% on one machine and jumped from 17.2% to 7.2% to 35.2% on another), so a base pretrained elsewhere
is a different model; `toy_base_model(pretrain=True)` (`--pretrain_base`) still rebuilds one from the recipe.

Pretraining evaluates greedy validation accuracy every `eval_every` steps and stops at the first evaluation inside
`[band_low, band_high]`. When an evaluation lands above the band, it rolls back to the last evaluation below it
(weights, optimizer and schedule; the data order is fixed by the step) and evaluates more often from there
(`refine_every`, e.g. every 5 then every step). It raises `BandNotReached` only when the band is unreachable: no
evaluation inside it by `max_steps`, even though every overshoot was refined down to single steps.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass

from .task import boxed_exact_match, is_trace, pretraining_corpus, toy_splits

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BaseSettings:
    """How the toy base is built and pretrained; its hash names the cache directory (DESIGN.md §6 sizes)."""

    hidden_size: int = 96  # 0.33M parameters (tied embeddings): the 0.8M model of DESIGN.md §6 cost twice the time for no gain here
    num_layers: int = 3
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 256
    max_steps: int = 1000  # fail loudly past this: the band was not reached
    eval_every: int = 50
    refine_every: tuple[int, ...] = (5, 1)  # after an overshoot: roll back, evaluate this often (then finer)
    band_low: float = 0.18  # stop at the first evaluation with band_low <= val accuracy <= band_high
    band_high: float = 0.30
    batch_size: int = 64
    learning_rate: float = 3e-3
    easy_max: int = 19
    easy_max_b: int | None = None
    hard_fraction: float = 0.2
    trace_fraction: float = 0.5  # base E (CALIBRATION.md): traces are half of the hard sums
    easy_trace_fraction: float | None = (
        0.5  # and half of the easy ones: the facts in trace position; None = 0
    )
    seed: int = 0

    def key(self, hard_prompts: list[str], val_prompts: list[str]) -> str:
        """A short hash of every setting and of the prompts it uses: a changed setting never reuses a cache."""
        fields = {k: v for k, v in asdict(self).items() if v is not None}  # an unset option keeps older keys
        blob = json.dumps({**fields, "hard": sorted(hard_prompts), "val": sorted(val_prompts), "format": 2},
                          sort_keys=True)  # fmt: skip
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


class BandNotReached(RuntimeError):
    """Pretraining ended (or overshot) without its validation accuracy inside the band."""


def greedy_completions(model, tokenizer, prompts: list[str], max_new_tokens: int = 28, batch_size: int = 256,
                       do_sample: bool = False, temperature: float = 1.0) -> list[str]:  # fmt: skip
    """Completions of `prompts` (left-padded batches, HF `generate`); the model's train/eval mode is restored."""
    import torch

    was_training = model.training
    model.eval()
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    texts = []
    try:
        with torch.no_grad():
            for start in range(0, len(prompts), batch_size):
                batch = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True,
                                  add_special_tokens=False).to(model.device)  # fmt: skip
                extra = {"temperature": temperature, "top_k": 0, "top_p": 1.0} if do_sample else {}
                out = model.generate(**batch, do_sample=do_sample, max_new_tokens=max_new_tokens, use_cache=True,
                                     pad_token_id=tokenizer.pad_token_id, **extra)  # fmt: skip
                texts += tokenizer.batch_decode(
                    out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True
                )
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return texts


def greedy_accuracy(model, tokenizer, dataset, max_new_tokens: int = 28, batch_size: int = 256) -> float:
    """Exact match of the last `\\boxed{}` of greedy completions to `dataset["answer"]`, in [0, 1]."""
    texts = greedy_completions(model, tokenizer, list(dataset["prompt"]), max_new_tokens, batch_size)
    return sum(boxed_exact_match(texts, list(dataset["answer"]))) / max(1, len(texts))


def format_profile(model, tokenizer, dataset, samples: int = 4, seed: int = 0) -> dict:
    """How often the model writes the trace format and how accurate each format is, greedy and sampled at T=1."""
    import torch

    prompts, answers = list(dataset["prompt"]), list(dataset["answer"])
    greedy = greedy_completions(model, tokenizer, prompts)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        sampled = greedy_completions(model, tokenizer, prompts * samples, do_sample=True)
    out = {}
    for name, texts, golds in (("greedy", greedy, answers), ("sampled", sampled, answers * samples)):
        right = boxed_exact_match(texts, golds)
        trace = [is_trace(t) for t in texts]
        n_trace = sum(trace)
        out[f"{name}_accuracy"] = sum(right) / len(texts)
        out[f"{name}_trace_rate"] = n_trace / len(texts)
        out[f"{name}_trace_accuracy"] = (
            sum(r for r, t in zip(right, trace, strict=True) if t) / n_trace if n_trace else None
        )
        n_direct = len(texts) - n_trace
        out[f"{name}_direct_accuracy"] = (
            sum(r for r, t in zip(right, trace, strict=True) if not t) / n_direct if n_direct else None
        )
    return out


def default_cache_dir() -> str:
    root = os.environ.get("BRIDGE_TRL_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "bridge_trl"))
    return os.path.join(root, "toy_base")


def pretrain_base(settings: BaseSettings, hard_prompts: list[str], val, progress: bool = True,
                  accuracy: Callable | None = None):  # fmt: skip
    """Pretrain the tiny Qwen2 with a plain causal-LM loop until greedy accuracy on `val` is in the band.

    Every token of `prompt + completion + <eos>` is a target (a corpus, not instruction tuning). The lr warms up,
    then stays constant: the stopping step is not known in advance, so a decay would tie the base to max_steps.
    `accuracy(model, tokenizer, val, step)` replaces greedy validation accuracy (tests). Returns (model, tokenizer,
    history, rollbacks): history is every evaluation [(step, val accuracy)] in the order made, rollbacks
    [(from step, back to step, new eval_every)].
    """
    import torch
    from tqdm.auto import tqdm

    from ..tiny import build_tiny_model, build_tokenizer

    accuracy = accuracy or (lambda model, tokenizer, data, step: greedy_accuracy(model, tokenizer, data))
    tokenizer = build_tokenizer()
    model = build_tiny_model(tokenizer, hidden_size=settings.hidden_size, num_hidden_layers=settings.num_layers,
                             num_attention_heads=settings.num_heads, num_key_value_heads=settings.num_kv_heads,
                             intermediate_size=settings.intermediate_size, seed=settings.seed)  # fmt: skip
    texts = pretraining_corpus(settings.max_steps * settings.batch_size, hard_prompts, settings.easy_max,
                               settings.hard_fraction, settings.trace_fraction, settings.seed,
                               settings.easy_max_b, settings.easy_trace_fraction or 0.0)  # fmt: skip
    eos = tokenizer.eos_token_id
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=0.0)
    warmup = 50
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))

    def snapshot(step: int) -> dict:  # everything the next steps read: the batch is a function of the step
        return {"step": step, "model": copy.deepcopy(model.state_dict()),
                "optimizer": copy.deepcopy(optimizer.state_dict()), "scheduler": scheduler.state_dict()}  # fmt: skip

    cadences = [
        settings.eval_every,
        *sorted(set(settings.refine_every) - {settings.eval_every}, reverse=True),
    ]
    level = 0  # index into cadences: how finely the current stretch is evaluated
    below = snapshot(0)  # the last evaluation below the band (step 0: the untrained model)
    history, rollbacks = [], []
    model.train()
    bar = tqdm(total=settings.max_steps, desc="Pretraining the toy base", disable=not progress)
    step = 0
    while step < settings.max_steps:
        step += 1
        batch = texts[(step - 1) * settings.batch_size : step * settings.batch_size]
        ids = [tokenizer(t, add_special_tokens=False)["input_ids"] + [eos] for t in batch]
        width = max(map(len, ids))
        input_ids = torch.tensor([x + [eos] * (width - len(x)) for x in ids])
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
        loss = model(
            input_ids=input_ids, attention_mask=mask, labels=input_ids.masked_fill(mask == 0, -100)
        ).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        bar.n = step
        bar.refresh()
        if step % cadences[level]:
            continue
        acc = accuracy(model, tokenizer, val, step)
        history.append((step, acc))
        bar.set_postfix(loss=f"{loss.item():.3f}", val_acc=f"{acc:.3f}", every=cadences[level])
        logger.debug("pretraining step %d: loss %.3f, val accuracy %.3f", step, loss.item(), acc)
        if settings.band_low <= acc <= settings.band_high:
            bar.close()
            model.eval()
            return model, tokenizer, history, rollbacks
        if acc < settings.band_low:
            below = snapshot(step)
        elif below is not None and level + 1 < len(cadences):
            # Overshot: replay the stretch since the last evaluation below the band, evaluating more often.
            level += 1
            rollbacks.append((step, below["step"], cadences[level]))
            logger.info("Pretraining overshot the band at step %d (%.3f): back to step %d, evaluating every %d",
                        step, acc, below["step"], cadences[level])  # fmt: skip
            model.load_state_dict(below["model"])
            optimizer.load_state_dict(below["optimizer"])
            scheduler.load_state_dict(below["scheduler"])
            step = below["step"]
        elif below is not None:
            # The band lies between two consecutive steps here; accuracy is not monotone, so train on.
            logger.info(
                "Pretraining stepped over the band between steps %d and %d; training on", step - 1, step
            )
            level, below = 0, None  # roll back again only to an evaluation below the band made after this one
    bar.close()
    raise BandNotReached(f"Val accuracy never reached [{settings.band_low}, {settings.band_high}] in "
                         f"{settings.max_steps} steps, every overshoot refined to single steps; history {history}; "
                         f"rollbacks (from, to, every) {rollbacks}.")  # fmt: skip


SHIPPED_BASE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shipped_base")
# SHA-256 of shipped_base/model.safetensors: the weights tuned.json and CALIBRATION.md were measured on.
SHIPPED_BASE_SHA256 = "010ea65277fa4a320c1ca097f1acff43fa575dc0f8cb0de35b41c70fd3314022"


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def shipped_base() -> str:
    """Path of the toy base that ships with the package, after checking its weights against the recorded hash."""
    weights = os.path.join(SHIPPED_BASE_DIR, "model.safetensors")
    if not os.path.exists(weights):
        raise FileNotFoundError(f"The shipped toy base is missing ({weights}): reinstall bridge_trl, or rebuild a "
                                "base from the recipe with `--pretrain_base` (not the calibrated one).")  # fmt: skip
    digest = file_sha256(weights)
    if digest != SHIPPED_BASE_SHA256:
        raise RuntimeError(f"The shipped toy base {weights} has SHA-256 {digest}, not the recorded "
                           f"{SHIPPED_BASE_SHA256}: it is not the base the tuning was measured on.")  # fmt: skip
    return SHIPPED_BASE_DIR


def _cpu_name() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        return None


def save_base(model, tokenizer, info: dict, path: str) -> str:
    """Write a base to `path` atomically (a temporary folder, then a rename): never a half-written base."""
    import platform

    import torch

    tmp = f"{path}.tmp{os.getpid()}"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    with open(os.path.join(tmp, "bridge_toy_settings.json"), "w") as f:
        json.dump(
            {**info, "machine": _cpu_name() or platform.machine(), "torch": torch.__version__}, f, indent=1
        )
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    old = f"{path}.old{os.getpid()}"
    if os.path.exists(path):  # a rebuild replaces the previous base only once the new one is complete
        os.rename(path, old)
    os.rename(tmp, path)
    if os.path.exists(old):
        import shutil

        shutil.rmtree(old)
    return path


def toy_base_model(settings: BaseSettings | None = None, splits: dict | None = None, cache_dir: str | None = None,
                   progress: bool = True, pretrain: bool = False) -> str:  # fmt: skip
    """Path of a toy base, `from_pretrained`-loadable.

    By default the shipped, calibrated base (`shipped_base()`): nothing is pretrained. `pretrain=True` rebuilds a
    base from `settings` (default: the recipe, `BaseSettings()`) into `<cache_dir>/<settings hash>/` (default
    `~/.cache/bridge_trl/toy_base`, or `$BRIDGE_TRL_CACHE/toy_base`), replacing what was there, so a stale cache
    never stands in for a pretraining that fails. Explicit `settings` without `pretrain` (small smoke bases, tests)
    reuse that cache when present. `bridge_toy_settings.json` beside the weights records the settings, every
    evaluation and every rollback.
    """
    if settings is None and not pretrain:
        return shipped_base()
    settings = settings or BaseSettings()
    splits = splits or toy_splits()
    hard = list(splits["rl"]["prompt"])
    path = os.path.join(cache_dir or default_cache_dir(), settings.key(hard, list(splits["val"]["prompt"])))
    if not pretrain and os.path.exists(os.path.join(path, "config.json")):
        logger.info("Toy base model: cached at %s", path)
        return path
    logger.info("Toy base model: pretraining until val accuracy is in [%g, %g] (saved at %s)",
                settings.band_low, settings.band_high, path)  # fmt: skip
    model, tokenizer, history, rollbacks = pretrain_base(settings, hard, splits["val"], progress)
    return save_base(model, tokenizer, {"settings": asdict(settings), "history": history, "rollbacks": rollbacks},
                     path)  # fmt: skip


def base_history(path: str) -> dict:
    """The settings and stopping history saved beside a cached base."""
    with open(os.path.join(path, "bridge_toy_settings.json")) as f:
        return json.load(f)
