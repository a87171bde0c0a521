"""The `tokenizer.*` keys of a GGUF file: llama.cpp runs no file without them.

Two sources, in this order:
- `tokenizer.gguf` (SIDECAR) beside the tokenizer: a tensor-less GGUF holding the `tokenizer.*` keys of the
  GGUF a model was converted from (`hf_qlimit.cli.gguf_to_hf` writes it), copied as they are, so that the
  exported file tokenizes as its source did (pre-tokenizer name, scores, merges, template).
- Rebuilt from the transformers tokenizer: byte-level BPE as llama.cpp's "gpt2" model (tokens, merges), a
  SentencePiece model (`tokenizer.model`) or a byte-fallback BPE as its "llama" model (tokens, scores); special
  token ids, whether BOS / EOS are added (found by encoding a text), the chat template. A byte-fallback BPE
  without `tokenizer.model` gets scores from its merge ranks (llama.cpp merges the highest score first, the
  BPE the lowest rank first). llama.cpp names pre-tokenizers by hashing the encodings of a test text; this file
  says "default" (its generic split) and logs it.
The token list always has one entry per embedding row: ids the tokenizer lacks become unused `[PAD{i}]`.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

from transformers.utils import logging

from .common import ExportError

logger = logging.get_logger(__name__)

SIDECAR = "tokenizer.gguf"
PREFIX = "tokenizer."
TOKENS_KEY = "tokenizer.ggml.tokens"


def copy_keys(reader: Any, writer: Any, prefix: str = PREFIX) -> int:
    """Copies every key of `reader` (a gguf.GGUFReader) named `prefix...` into `writer`; returns how many."""
    import gguf

    copied = 0
    for name, field in reader.fields.items():
        if not name.startswith(prefix):
            continue
        kind = field.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            sub = field.types[-1]
            values = (
                [bytes(field.parts[i]) for i in field.data] if sub == gguf.GGUFValueType.STRING else field.contents()
            )
            writer.add_key_value(name, values, kind, sub_type=sub)
        elif kind == gguf.GGUFValueType.STRING:  # raw bytes: token text need not be valid UTF-8
            writer.add_key_value(name, bytes(field.parts[field.data[0]]), kind)
        else:
            writer.add_key_value(name, field.contents(), kind)
        copied += 1
    return copied


def write_sidecar(source: str | Path, out_path: str | Path) -> int:
    """Writes the `tokenizer.*` keys of the GGUF file `source` to a tensor-less GGUF `out_path`; returns how many
    keys (0: `source` has none, and nothing is written)."""
    import gguf

    reader = gguf.GGUFReader(str(source))
    if not any(name.startswith(PREFIX) for name in reader.fields):
        return 0
    arch = reader.fields.get("general.architecture")
    writer = gguf.GGUFWriter(str(out_path), arch.contents() if arch is not None else "llama")
    copied = copy_keys(reader, writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    return copied


def add_tokenizer(writer: Any, tokenizer: Any, n_vocab: int) -> None:
    """Writes the tokenizer keys for an embedding of `n_vocab` rows. `tokenizer`: a transformers tokenizer or the
    folder it was saved to; a `tokenizer.gguf` in that folder (or in the folder the tokenizer was loaded from) wins."""
    if tokenizer is None:
        raise ExportError(
            "llama.cpp cannot run a GGUF without its tokenizer, and none was given: pass `tokenizer=` (a "
            "tokenizer or its folder) to export_gguf, or export a folder that holds the tokenizer files "
            "(tokenizer.save_pretrained(folder) beside model.save_pretrained(folder))."
        )
    folder = Path(tokenizer) if isinstance(tokenizer, (str, Path)) else _loaded_from(tokenizer)
    hf = None if isinstance(tokenizer, (str, Path)) else tokenizer
    if folder is not None and (folder / SIDECAR).is_file():
        hf = hf if hf is not None else _load(folder, required=False)
        if _add_sidecar(writer, folder / SIDECAR, n_vocab, hf):
            return
    _add_rebuilt(writer, hf if hf is not None else _load(folder, required=True), n_vocab)


def _loaded_from(tokenizer: Any) -> Path | None:
    path = Path(str(getattr(tokenizer, "name_or_path", "") or ""))
    return path if str(path) and path.is_dir() else None


def _load(folder: Path, required: bool) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError) as err:
        if not required:
            return None
        raise ExportError(
            f"No tokenizer loads from {folder} ({err}); llama.cpp cannot run a GGUF without one. Save the "
            "tokenizer there (tokenizer.save_pretrained) or pass `tokenizer=` to export_gguf."
        ) from err


def _add_sidecar(writer: Any, path: Path, n_vocab: int, hf: Any) -> bool:
    """Copies the sidecar's keys when its tokens fit the embedding (and the tokenizer beside it); False if not."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    field = reader.fields.get(TOKENS_KEY)
    tokens = field.contents() if field is not None else []
    if len(tokens) != n_vocab:
        logger.warning(f"{path} holds {len(tokens)} tokens for {n_vocab} embedding rows; rebuilding the tokenizer.")
        return False
    if hf is not None:
        own = hf.convert_ids_to_tokens(list(range(min(len(hf), n_vocab))))
        differ = [i for i, (a, b) in enumerate(zip(own, tokens)) if a is not None and a != b]
        if differ:
            logger.warning(
                f"{path} disagrees with the tokenizer beside it (token {differ[0]}: {tokens[differ[0]]!r} there, "
                f"{own[differ[0]]!r} here); rebuilding the tokenizer keys from the tokenizer."
            )
            return False
    copy_keys(reader, writer)
    logger.info(f"Tokenizer keys copied from {path} (the GGUF this model was converted from).")
    return True


def _add_rebuilt(writer: Any, tokenizer: Any, n_vocab: int) -> None:
    import gguf

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        model, tokens, scores, types = _vocabulary(tokenizer, Path(tmp), n_vocab)
        special = gguf.SpecialVocab(tmp, load_merges=model == "gpt2", n_vocab=n_vocab)
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre("default")
    logger.info(
        "tokenizer.ggml.pre = 'default' (llama.cpp's generic pre-tokenizer split): llama.cpp identifies a "
        "model's own split by hashing its encodings; convert the FP model with convert_hf_to_gguf.py to get it."
    )
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if scores is not None:
        writer.add_token_scores(scores)
        writer.add_add_space_prefix(_adds_space_prefix(tokenizer))
    for kind in ("bos", "eos", "unk", "pad"):  # what the tokenizer object knows and the files did not say
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if isinstance(token_id, int) and kind not in special.special_token_ids:
            special.special_token_ids[kind] = token_id
    special.add_special_token.update(_adds_bos_eos(tokenizer))
    if special.chat_template is None and getattr(tokenizer, "chat_template", None):
        special.chat_template = tokenizer.chat_template
    if model == "gpt2" and not special.merges:
        raise ExportError(
            "The byte-level BPE tokenizer has no merges; llama.cpp's BPE needs them. Export with the tokenizer "
            "files the model was released with (tokenizer.json or merges.txt holding the merges)."
        )
    special.add_to_gguf(writer, quiet=True)


def _vocabulary(tokenizer: Any, folder: Path, n_vocab: int) -> tuple[str, list[str], list[float] | None, list[int]]:
    """(llama.cpp tokenizer model, tokens, scores or None, token types), one entry per embedding row."""
    import gguf

    size = len(tokenizer)
    if size > n_vocab:
        raise ExportError(
            f"The tokenizer has {size} tokens but the embedding {n_vocab} rows; ids past the embedding cannot run. "
            "Export with the tokenizer the model was trained with."
        )
    spec = _tokenizer_json(folder)
    if (folder / "tokenizer.model").is_file() and _has_sentencepiece():
        model, base = "llama", list(gguf.vocab.SentencePieceVocab(folder).sentencepiece_tokens())
        tokens, scores, types = [t.decode() for t, _, _ in base], [s for _, s, _ in base], [int(k) for *_, k in base]
    elif spec is not None and spec["model"]["type"] == "BPE":
        model, tokens, scores, types = _from_bpe(spec)
    else:
        kind = spec["model"]["type"] if spec is not None else type(tokenizer).__name__
        raise ExportError(
            f"The tokenizer ({kind}) is neither a byte-level BPE (llama.cpp's gpt2), a byte-fallback BPE nor a "
            "SentencePiece model (llama.cpp's llama) with tokenizer.model; GGUF export cannot write it. Convert the FP "
            "model with llama.cpp's convert_hf_to_gguf.py, or export to compressed-tensors."
        )
    _overlay_added(tokenizer, tokens, scores, types, size)
    pad = n_vocab - len(tokens)
    tokens += [f"[PAD{i}]" for i in range(len(tokens), n_vocab)]
    types += [int(gguf.TokenType.UNUSED)] * pad
    if model == "llama":
        scores = [*scores, *[-10000.0] * pad]
        for i, text in enumerate(tokens):  # llama.cpp decodes these as the byte (even where marked special)
            if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text):
                types[i] = int(gguf.TokenType.BYTE)
        unk = getattr(tokenizer, "unk_token_id", None)
        if isinstance(unk, int) and unk < n_vocab:
            types[unk] = int(gguf.TokenType.UNKNOWN)
        return model, tokens, scores, types
    return model, tokens, None, types


def _tokenizer_json(folder: Path) -> dict | None:
    path = folder / "tokenizer.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _has_sentencepiece() -> bool:
    import importlib.util

    return importlib.util.find_spec("sentencepiece") is not None


def _from_bpe(spec: dict) -> tuple[str, list[str], list[float], list[int]]:
    """A tokenizer.json BPE: byte-level -> "gpt2"; byte-fallback (SentencePiece converted) -> "llama"."""
    import gguf

    bpe = spec["model"]
    byte_level = "ByteLevel" in json.dumps([spec.get("pre_tokenizer"), spec.get("decoder")])
    if not byte_level and not bpe.get("byte_fallback"):
        raise ExportError(
            "The BPE tokenizer is neither byte-level nor byte-fallback; llama.cpp has no tokenizer model for it. "
            "Export to compressed-tensors instead."
        )
    vocab: dict[str, int] = bpe["vocab"]
    tokens = [""] * (max(vocab.values(), default=-1) + 1)
    for text, i in vocab.items():
        tokens[i] = text
    types = [int(gguf.TokenType.NORMAL)] * len(tokens)
    if byte_level:
        return "gpt2", tokens, [0.0] * len(tokens), types
    scores = [-float(len(bpe.get("merges", [])) + 1)] * len(tokens)  # below every merge
    for rank, merge in enumerate(bpe.get("merges", [])):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        merged = vocab.get(left + right)
        if merged is not None:
            scores[merged] = max(scores[merged], -float(rank))
    return "llama", tokens, scores, types


def _overlay_added(tokenizer: Any, tokens: list[str], scores: list[float], types: list[int], size: int) -> None:
    """Added tokens (special: CONTROL, else USER_DEFINED) and ids the base vocabulary skips (unused)."""
    import gguf

    grow = size - len(tokens)
    if grow > 0:
        tokens += [""] * grow
        scores += [0.0] * grow
        types += [int(gguf.TokenType.NORMAL)] * grow
    for i, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if i < len(tokens):
            tokens[i] = added.content
            scores[i] = -1000.0
            types[i] = int(gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED)
    for i, text in enumerate(tokens):
        if text == "":
            tokens[i], types[i] = f"[PAD{i}]", int(gguf.TokenType.UNUSED)


def _adds_space_prefix(tokenizer: Any) -> bool:
    """Whether a SentencePiece-style tokenizer marks the first word as following a space ("▁a" for "a")."""
    first = tokenizer.convert_ids_to_tokens(tokenizer("a", add_special_tokens=False)["input_ids"])
    return bool(first) and first[0].startswith("\u2581")


def _adds_bos_eos(tokenizer: Any) -> dict[str, bool]:
    """Whether encoding a text puts the BOS token first / the EOS token last (what llama.cpp then does too)."""
    plain = tokenizer("a b", add_special_tokens=False)["input_ids"]
    full = tokenizer("a b")["input_ids"]
    bos, eos = getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)
    starts = len(full) > len(plain) and bos is not None and full[0] == bos
    ends = len(full) > len(plain) and eos is not None and full[-1] == eos
    return {"bos": bool(starts), "eos": bool(ends)}
