"""The model card (`README.md`) of a run, as TRL writes it, for every `method`.

TRL's `create_model_card` fills one template with the trainer's `_name` and `_paper`, links the base model and
the dataset as Hub ids, and shows a `pipeline(model=hub_model_id)` snippet. For BRIDGE that is wrong three ways:
one trainer runs eight methods, a local path is not a Hub id, and the trained policy is π(θ, w), θ plus the
adapter in `adapter/` (or the merged folder with `save_merged`), which `pipeline` on the folder would not load.

`BridgeCardMixin.create_model_card` keeps TRL's signature, card metadata and sections (framework versions,
citations, tracker badges) and writes: the method actually run and its paper, the base model's Hub id or "a local
model", the datasets by name (a Hub link only for a Hub id), the config's key fields, and a snippet that loads the
policy. `save_model` (and so every checkpoint) and `push_to_hub` write it: `Trainer.push_to_hub` calls
`save_model` and then this method, and uploads the output folder (θ, `adapter/`, `README.md`).
"""

from __future__ import annotations

import os
import textwrap
from importlib.metadata import version

from huggingface_hub import ModelCard, ModelCardData
from peft import PeftModel
from transformers import is_wandb_available
from trl.trainer.utils import get_config_model_id

from .checkpoint import ADAPTER_DIR, MERGED_DIR

BRIDGE_PAPER = {
    "title": "Beyond Two-Stage Training: Cooperative SFT and RL for LLM Reasoning",
    "id": "2509.06948",
    "citation": textwrap.dedent("""\
        @article{chen2025bridge,
            title        = {{Beyond Two-Stage Training: Cooperative SFT and RL for LLM Reasoning}},
            author       = {Liang Chen and Xueting Han and Li Shen and Jing Bai and Kam-Fai Wong},
            year         = 2025,
            eprint       = {arXiv:2509.06948},
        }"""),
}
GRPO_PAPER = {
    "title": "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models",
    "id": "2402.03300",
    "citation": textwrap.dedent("""\
        @article{shao2024deepseekmath,
            title        = {{DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models}},
            author       = {Zhihong Shao and Peiyi Wang and Qihao Zhu and Runxin Xu and Junxiao Song and Mingchuan Zhang and Y. K. Li and Y. Wu and Daya Guo},
            year         = 2024,
            eprint       = {arXiv:2402.03300},
        }"""),
}
CHORD_PAPER = {
    "title": "On-Policy RL Meets Off-Policy Experts: Harmonizing Supervised Fine-Tuning and Reinforcement Learning "
    "via Dynamic Weighting",
    "id": "2508.11408",
    "citation": textwrap.dedent("""\
        @article{zhang2025chord,
            title        = {{On-Policy RL Meets Off-Policy Experts: Harmonizing Supervised Fine-Tuning and Reinforcement Learning via Dynamic Weighting}},
            author       = {Wenhao Zhang and Yuexiang Xie and Yuchang Sun and Yanxi Chen and Guoyin Wang and Yaliang Li and Bolin Ding and Jingren Zhou},
            year         = 2025,
            eprint       = {arXiv:2508.11408},
        }"""),
}
LUFFY_PAPER = {
    "title": "Learning to Reason under Off-Policy Guidance",
    "id": "2504.14945",
    "citation": textwrap.dedent("""\
        @article{yan2025luffy,
            title        = {{Learning to Reason under Off-Policy Guidance}},
            author       = {Jianhao Yan and Yafu Li and Zican Hu and Zhi Wang and Ganqu Cui and Xiaoye Qu and Yu Cheng and Yue Zhang},
            year         = 2025,
            eprint       = {arXiv:2504.14945},
        }"""),
}
HPT_PAPER = {
    "title": "Towards a Unified View of Large Language Model Post-Training",
    "id": "2509.04419",
    "citation": textwrap.dedent("""\
        @article{lv2025towards,
            title        = {{Towards a Unified View of Large Language Model Post-Training}},
            author       = {Xingtai Lv and Yuxin Zuo and Youbang Sun and Hongyi Liu and Yuntian Wei and Zhekai Chen and Lixuan He and Xuekai Zhu and Kaiyan Zhang and Bingning Wang and others},
            year         = 2025,
            eprint       = {arXiv:2509.04419},
        }"""),
}
RELIFT_PAPER = {
    "title": "Learning What Reinforcement Learning Can't: Interleaved Online Fine-Tuning for Hardest Questions",
    "id": "2506.07527",
    "citation": textwrap.dedent("""\
        @article{ma2025learning,
            title        = {{Learning What Reinforcement Learning Can't: Interleaved Online Fine-Tuning for Hardest Questions}},
            author       = {Lu Ma and Hao Liang and Meiyi Qiang and Lexiang Tang and Xiaochen Ma and Zhen Hao Wong and Junbo Niu and Chengyu Shen and Runming He and Bin Cui and others},
            year         = 2025,
            eprint       = {arXiv:2506.07527},
        }"""),
}
# method → (what the card says was run, its own paper or None, tags). Baselines name BRIDGE's paper as where they
# are compared; CHORD and LUFFY name their own.
METHOD_CARDS = {
    "bridge": ("BRIDGE", BRIDGE_PAPER, ["bridge"]),
    "mix": ("the mix baseline of BRIDGE (one update of θ on (1−λ) L_SFT + λ L_RL, no upper level)", None, ["mix"]),
    "alternating": ("the alternating baseline of BRIDGE (Algorithm 1: a GRPO update, then an SFT update)", None,
                    ["alternating"]),
    "rl": ("GRPO alone (the RL-only baseline of BRIDGE)", GRPO_PAPER, ["grpo"]),
    "sft": ("SFT alone (the SFT-only baseline of BRIDGE)", None, ["sft"]),
    "cold_start": ("the cold-start baseline of BRIDGE (SFT, then GRPO)", None, ["cold_start", "grpo", "sft"]),
    "chord": ("CHORD", CHORD_PAPER, ["chord"]),
    "luffy": ("LUFFY", LUFFY_PAPER, ["luffy"]),
    "hpt": ("HPT", HPT_PAPER, ["hpt"]),
    "relift": ("ReLIFT", RELIFT_PAPER, ["relift"]),
}  # fmt: skip
TRL_CITATION = textwrap.dedent("""\
    @software{vonwerra2020trl,
      title   = {{TRL: Transformers Reinforcement Learning}},
      author  = {von Werra, Leandro and Belkada, Younes and Tunstall, Lewis and Beeching, Edward and Thrush, Tristan and Lambert, Nathan and Huang, Shengyi and Rasul, Kashif and Gallouédec, Quentin},
      license = {Apache-2.0},
      url     = {https://github.com/huggingface/trl},
      year    = {2020}
    }""")
LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".arrow", ".txt")


def is_hub_id(name: str | None) -> bool:
    """A Hub repo id ("namespace/name"), not a local path."""
    if not name or os.path.exists(os.path.expanduser(name)) or name.startswith((".", "/", "~")):
        return False
    return name.count("/") == 1 and not name.endswith(LOCAL_SUFFIXES)


def dataset_text(name: str) -> str:
    if is_hub_id(name):
        return f"[{name}](https://huggingface.co/datasets/{name})"
    return f"`{os.path.basename(name.rstrip('/')) or name}` (local)" if os.sep in name or name.endswith(
        LOCAL_SUFFIXES) else f"`{name}`"  # fmt: skip


def usage_snippet(path: str, adapter: bool, merged: bool) -> str:
    """Python that loads the trained policy π(θ, w) from `path` (a Hub id or a folder) and generates with it."""
    if adapter and merged:
        load = (f'model = AutoModelForCausalLM.from_pretrained("{path}", subfolder="{MERGED_DIR}")  # π(θ, w), '
                "merged\n")  # fmt: skip
        imports = "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
    elif adapter:
        load = (f'model = AutoModelForCausalLM.from_pretrained("{path}")  # θ, the trained base weights\n'
                f'model = PeftModel.from_pretrained(model, "{path}", subfolder="{ADAPTER_DIR}")  # + w: π(θ, w)\n')  # fmt: skip
        imports = "from peft import PeftModel\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
    else:
        load = f'model = AutoModelForCausalLM.from_pretrained("{path}")  # θ: the whole policy\n'
        imports = "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
    return (
        f"{imports}\n{load}"
        f'tokenizer = AutoTokenizer.from_pretrained("{path}")\n'
        'inputs = tokenizer("Question: what is 12 + 30?\\nAnswer:", return_tensors="pt")\n'
        "output = model.generate(**inputs, max_new_tokens=64)\n"
        'print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))\n'
    )


def key_fields(args, adapter_config) -> list[tuple[str, str]]:
    """(field, value) rows of the card's configuration table: what distinguishes this run."""
    m = args.method
    rows = [("method", f"`{m}`"), ("learning rate α (`learning_rate`)", f"{args.learning_rate:g}")]
    if m in ("bridge", "mix"):
        lam = f"{args.bridge_lambda:g}"
        if args.lambda_schedule != "constant":
            lam = f"{args.lambda_start:g} → {lam}, {args.lambda_schedule} over {args.lambda_warmup_ratio:g} of the run"
        rows.append(("λ (`bridge_lambda`)", lam))
    if adapter_config is not None:
        rows.append(("adapter learning rate β (`adapter_learning_rate`)", f"{args.adapter_learning_rate:g}"))
        targets = adapter_config.target_modules  # PEFT expands "all-linear" to module paths: show their kinds
        targets = (
            targets
            if isinstance(targets, str)
            else ", ".join(sorted({t.split(".")[-1] for t in targets or []}))
        )
        rows.append(("LoRA rank r / alpha / target modules",
                     f"{adapter_config.r} / {adapter_config.lora_alpha:g} / {targets}"))  # fmt: skip
    if m in ("alternating", "cold_start", "relift"):
        rows.append(("SFT learning rate (`sft_learning_rate`)", f"{args.sft_learning_rate:g}"))
    if m == "relift":
        rows.append(("SFT buffer size / failed if reward ≤",
                     f"{args.relift_buffer_size} / {args.relift_fail_reward:g}"))  # fmt: skip
    if m == "cold_start" and args.cold_start_switch == "val_loss":
        rows.append(("switch: held-out SFT loss; patience / min delta / every",
                     f"{args.cold_start_patience} / {args.cold_start_min_delta:g} / "
                     f"{args.cold_start_eval_steps} steps"))  # fmt: skip
    if m == "chord":
        rows.append(("μ peak / valley", f"{args.chord_mu_peak:g} / {args.chord_mu_valley:g}"))
    if m == "luffy":
        rows.append(
            ("off-policy traces per group / γ", f"{args.luffy_num_off_policy} / {args.luffy_shaping_gamma:g}")
        )
    if m == "hpt":
        rows.append(("SFT if correct rollouts ≤ (reward ≥ threshold) / SFT coefficient",
                     f"{args.hpt_switch_gate} (≥ {args.hpt_correct_threshold:g}) / {args.hpt_sft_coef:g}"))  # fmt: skip
    if m != "sft":
        rows.append(("rollouts per prompt (`num_generations`)", str(args.num_generations)))
        rows.append(("KL coefficient (`beta`)", f"{args.beta:g}"))
    return rows


def render_card(
    *, model_name, base_model, datasets, args, adapter_config, path, merged, tags, tracker_urls
) -> ModelCard:
    """The card's text: TRL's metadata and sections, with BRIDGE's method, policy and configuration."""
    what, paper, method_tags = METHOD_CARDS[args.method]
    hub_datasets = [d for d in datasets if is_hub_id(d)]
    data = ModelCardData(base_model=base_model if is_hub_id(base_model) else None, datasets=hub_datasets or None,
                         library_name="transformers", licence="license", model_name=model_name,
                         tags=["generated_from_trainer", *sorted({*tags, "trl", "bridge_trl", *method_tags})])  # fmt: skip
    base = (
        f"[{base_model}](https://huggingface.co/{base_model})" if is_hub_id(base_model) else "a local model"
    )
    on = f" on {', '.join(dataset_text(d) for d in datasets)}" if datasets else ""
    intro = f"This model is a fine-tuned version of {base}{on}."
    if paper is not None:
        method = (
            f"{what}, a method introduced in [{paper['title']}](https://huggingface.co/papers/{paper['id']})"
        )
    else:
        method = f"{what}, as compared in [{BRIDGE_PAPER['title']}](https://huggingface.co/papers/{BRIDGE_PAPER['id']})"
    if adapter_config is not None:
        policy = (f"The policy is π(θ, w): the trained base weights θ in the folder and the LoRA adapter w in "
                  f"`{ADAPTER_DIR}/`" + (f", merged into one model in `{MERGED_DIR}/`" if merged else "") + ".")  # fmt: skip
    else:
        policy = "The policy is the trained weights θ alone (no adapter)."
    table = "\n".join(f"| {k} | {v} |" for k, v in key_fields(args, adapter_config))
    badges = " ".join(f"[{name}]({url})" for name, url in tracker_urls.items() if url)
    badges = f"\n{badges}\n" if badges else ""
    cites = [c for c in (paper or {}, BRIDGE_PAPER if paper is not BRIDGE_PAPER else {}) if c]
    citations = "\n\n".join(f"```bibtex\n{c['citation']}\n```" for c in cites)
    versions = "\n".join(f"- {name}: {version(pkg)}" for name, pkg in (
        ("TRL", "trl"), ("Transformers", "transformers"), ("Pytorch", "torch"), ("Datasets", "datasets"),
        ("Tokenizers", "tokenizers"), ("PEFT", "peft")))  # fmt: skip
    body = f"""
# Model Card for {model_name}

{intro}
It has been trained using [TRL](https://github.com/huggingface/trl), with `bridge_trl`'s `BridgeTrainer` (a
`GRPOTrainer`).

## Quick start

{policy}

```python
{usage_snippet(path, adapter_config is not None, merged)}```

## Training procedure
{badges}
This model was trained with {method}.

| field | value |
|---|---|
{table}

### Framework versions

{versions}

## Citations

{citations}

Cite TRL as:

```bibtex
{TRL_CITATION}
```
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


class BridgeCardMixin:
    """`create_model_card` for every method, written by `save_model` (checkpoints too) and `push_to_hub`."""

    card_datasets: list[str] | None = (
        None  # names of the training data; the CLI sets them, or `dataset_name=`
    )

    def create_model_card(self, model_name: str | None = None, dataset_name: str | list[str] | None = None,
                          tags: str | list[str] | None = None, output_dir: str | None = None) -> None:  # fmt: skip
        """TRL's `create_model_card`, writing `<output_dir or args.output_dir>/README.md` for the method run."""
        if not self.is_world_process_zero():
            return
        if dataset_name:
            self.card_datasets = [dataset_name] if isinstance(dataset_name, str) else list(dataset_name)
        output_dir = output_dir or self.args.output_dir
        if model_name is None:
            hub = self.args.hub_model_id
            model_name = hub.split("/")[-1] if hub else os.path.basename(os.path.abspath(output_dir))
        model = self.accelerator.unwrap_model(self.model)
        adapter = model.peft_config.get("default") if isinstance(model, PeftModel) else None
        hub_id = self.hub_model_id if getattr(self, "hub_model_id", None) else self.args.hub_model_id
        path = hub_id if (self.args.push_to_hub or hub_id) and hub_id else os.path.abspath(output_dir)
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        urls = {"Weights & Biases": None}
        if is_wandb_available():
            import wandb

            urls["Weights & Biases"] = wandb.run.url if wandb.run is not None else None
        card = render_card(model_name=model_name, base_model=get_config_model_id(model.config),
                           datasets=self.card_datasets or [], args=self.args, adapter_config=adapter, path=path,
                           merged=self.args.save_merged and adapter is not None, tags=tags, tracker_urls=urls)  # fmt: skip
        os.makedirs(output_dir, exist_ok=True)
        card.save(os.path.join(output_dir, "README.md"))
