"""GGUF export: per family, the file holds what llama.cpp reads (architecture and hyper-parameter keys, tokenizer
keys, exactly the tensor names it loads, no duplicate tied head) with hf_qlimit's values; a model converted from
a GGUF keeps its source's tokenizer keys; what cannot run is refused. llama.cpp itself is never run here."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

import hf_qlimit
from hf_qlimit import QLimitConfig
from hf_qlimit.export import ExportError

gguf = pytest.importorskip("gguf", reason="the `gguf` package (the `examples` extra) writes GGUF files")

VOCAB = 96  # embedding rows; the tokenizers below have fewer tokens, so the export pads the list
CORPUS = ["hello world, the cat sat on the mat.", "a quick brown fox jumps over the lazy dog!"] * 20
# transformers model type -> llama.cpp architecture, its block tensors and their transformers modules
ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma",
        "gemma2": "gemma2", "gemma3_text": "gemma3", "phi3": "phi3"}  # fmt: skip
T = gguf.MODEL_TENSOR
_ATTN = {"self_attn.q_proj": T.ATTN_Q, "self_attn.k_proj": T.ATTN_K, "self_attn.v_proj": T.ATTN_V}
_MLP = {"mlp.gate_proj": T.FFN_GATE, "mlp.up_proj": T.FFN_UP, "mlp.down_proj": T.FFN_DOWN}
_LLAMA = {**_ATTN, **_MLP, "self_attn.o_proj": T.ATTN_OUT, "input_layernorm": T.ATTN_NORM,
          "post_attention_layernorm": T.FFN_NORM}  # fmt: skip
_QK_NORM = {"self_attn.q_norm": T.ATTN_Q_NORM, "self_attn.k_norm": T.ATTN_K_NORM}
_GEMMA2 = {**_LLAMA, "post_attention_layernorm": T.ATTN_POST_NORM, "pre_feedforward_layernorm": T.FFN_PRE_NORM,
           "post_feedforward_layernorm": T.FFN_POST_NORM}  # fmt: skip
BLOCK = {
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": {**_LLAMA, **_QK_NORM}, "gemma": _LLAMA,
    "gemma2": _GEMMA2, "gemma3_text": {**_GEMMA2, **_QK_NORM},
    "phi3": {"self_attn.qkv_proj": T.ATTN_QKV, "self_attn.o_proj": T.ATTN_OUT, "mlp.gate_up_proj": T.FFN_UP,
             "mlp.down_proj": T.FFN_DOWN, "input_layernorm": T.ATTN_NORM, "post_attention_layernorm": T.FFN_NORM},
}  # fmt: skip
PERMUTED = ("llama", "mistral")  # llama.cpp's rotary pairs neighbouring rows of Q and K there
GEMMA = ("gemma", "gemma2", "gemma3_text")  # norm weights stored as 1 + w


def tokenizer(texts: list[str] = CORPUS, size: int = 80) -> PreTrainedTokenizerFast:
    """A byte-level BPE (<pad>, <s>, </s> at 0, 1, 2) that puts <s> first, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=size, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", chat_template="{{ messages }}"
    )


def build(kind: str, tie: bool | None = None, vocab: int = VOCAB) -> torch.nn.Module:
    """A tiny float `kind` (hidden 64, 4 heads of 16 over 2 KV heads), weights spread so that a wrong row order or
    norm shows."""
    sizes = {"vocab_size": vocab, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 64,
             "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}  # fmt: skip
    if tie is not None:
        sizes["tie_word_embeddings"] = tie
    if kind in ("gemma2", "gemma3_text"):
        sizes |= {"num_hidden_layers": 3, "sliding_window": 4, "query_pre_attn_scalar": 16,
                  "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}  # fmt: skip
    config = AutoConfig.for_model(kind, **sizes)
    torch.manual_seed(0)
    net = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(-0.5, 0.5) if kind in GEMMA else p.uniform_(0.5, 1.5)
            elif p.dim() == 2 and "embed" not in name:
                p.normal_(0, 0.15)
            else:
                p.normal_(0, 0.3)
    return net


def model(kind: str, tie: bool | None = None, vocab: int = VOCAB, **quant) -> torch.nn.Module:
    """`build(kind, tie, vocab)` quantized RTN W4 group 32 (or as `quant` says)."""
    calib = [
        {"input_ids": torch.randint(3, VOCAB, (16,), generator=torch.Generator().manual_seed(i))} for i in range(4)
    ]
    base = {"weight_bits": 4, "act_bits": None, "group_size": 32, "method": "rtn", "num_samples": 4}
    return build(kind, tie, vocab).quantize_qlimit(calib, QLimitConfig(**{**base, **quant}))


def read(path) -> tuple[dict, dict]:
    reader = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in reader.fields.items()}, {t.name: t for t in reader.tensors}


def values(tensor) -> torch.Tensor:
    data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    return torch.from_numpy(np.array(data, dtype=np.float32)).reshape(*reversed(tensor.shape.tolist()))


def llama_cpp_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    # llama.cpp's convert_hf_to_gguf.py (LlamaModel.permute): its rotary embedding pairs neighbouring rows
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def expected_names(kind: str, blocks: int, tied: bool) -> set[str]:
    """The tensor names llama.cpp loads for `kind`, from gguf's tensor enum (never from the exporter's mapping)."""
    arch = getattr(gguf.MODEL_ARCH, ARCH[kind].upper())
    tensors = [(t, None) for t in (T.TOKEN_EMBD, T.OUTPUT_NORM, *(() if tied else (T.OUTPUT,)))]
    tensors += [(t, i) for i in range(blocks) for t in BLOCK[kind].values()]
    assert all(t in gguf.MODEL_TENSORS[arch] for t, _ in tensors)
    names = {gguf.TENSOR_NAMES[t].format(bid=i) + ".weight" for t, i in tensors}
    if kind == "qwen2":  # q/k/v biases
        names |= {f"blk.{i}.attn_{x}.bias" for i in range(blocks) for x in "qkv"}
    return names


FAMILIES = [(kind, None) for kind in ARCH] + [("llama", True), ("qwen3", True)]


@pytest.mark.parametrize(("kind", "tie"), FAMILIES, ids=[f"{k}{'-tied' if t else ''}" for k, t in FAMILIES])
def test_each_family_holds_what_llama_cpp_reads(tmp_path, kind, tie):
    net, tok = model(kind, tie), tokenizer()
    kv, tensors = read(hf_qlimit.export(net, tmp_path, format="gguf", tokenizer=tok))
    config, arch = net.config, ARCH[kind]
    tied = getattr(net.get_input_embeddings(), "reads_head_codes", False)
    assert tied == (tie or kind in GEMMA)  # the quantized model shares the head's codes
    assert kv["general.architecture"] == arch and kv["general.quantization_version"] == gguf.GGML_QUANT_VERSION
    assert kv["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_1
    expected = {"block_count": config.num_hidden_layers, "embedding_length": 64, "feed_forward_length": 128,
                "context_length": 64, "attention.head_count": 4, "attention.head_count_kv": 2,
                "attention.key_length": 16, "attention.value_length": 16, "rope.dimension_count": 16}  # fmt: skip
    if kind == "gemma2":
        expected |= {"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}
    if kind in ("gemma2", "gemma3_text"):
        expected["attention.sliding_window"] = 4
        assert kv[f"{arch}.attention.sliding_window_pattern"] == [True, False, True]
    if kind == "gemma3_text":
        expected |= {"rope.freq_base": 1e6, "rope.freq_base_swa": 1e4}
    if kind == "phi3":
        expected |= {"rope.scaling.original_context_length": config.original_max_position_embeddings}
    assert {k: kv.get(f"{arch}.{k}") for k in expected} == pytest.approx(expected)
    assert kv[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(config.rms_norm_eps)

    # tokenizer: the tokenizer's own tokens, then unused pads up to the embedding's rows
    own = tok.convert_ids_to_tokens(list(range(len(tok))))
    assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.tokens"][: len(own)] == own
    assert kv["tokenizer.ggml.tokens"][len(own) :] == [f"[PAD{i}]" for i in range(len(own), VOCAB)]
    kinds = kv["tokenizer.ggml.token_type"]
    assert kinds[:3] == [gguf.TokenType.CONTROL] * 3 and set(kinds[3 : len(own)]) == {gguf.TokenType.NORMAL}
    assert set(kinds[len(own) :]) == {gguf.TokenType.UNUSED}
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    assert kv["tokenizer.ggml.merges"] == [" ".join(m) for m in merges]
    assert (kv["tokenizer.ggml.bos_token_id"], kv["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert (kv["tokenizer.ggml.add_bos_token"], kv["tokenizer.ggml.add_eos_token"]) == (True, False)
    assert kv["tokenizer.chat_template"] == "{{ messages }}" and kv["tokenizer.ggml.pre"] == "default"

    assert set(tensors) == expected_names(kind, config.num_hidden_layers, tied)
    emb, head = net.get_input_embeddings(), net.get_output_embeddings()
    assert torch.equal(values(tensors["token_embd.weight"]), emb.quantized_weight())  # F32: 8-bit per-row grid
    if not tied:
        assert torch.equal(values(tensors["output.weight"]), head.quantized_weight())
    heads = {"self_attn.q_proj": 4, "self_attn.k_proj": 2}
    for i in range(config.num_hidden_layers):
        for module, target in BLOCK[kind].items():
            hf = net.get_submodule(f"model.layers.{i}.{module}")
            got = values(tensors[gguf.TENSOR_NAMES[target].format(bid=i) + ".weight"])
            if "norm" in module:
                assert torch.equal(got, hf.weight.detach() + (1.0 if kind in GEMMA else 0.0))
                continue
            want = hf.quantized_weight()
            if kind in PERMUTED and module in heads:
                want = llama_cpp_rows(want, heads[module])
            assert tensors[gguf.TENSOR_NAMES[target].format(bid=i) + ".weight"].tensor_type.name == "Q4_1"
            # the codes are hf_qlimit's; only the float16 scale and offset round
            assert (got - want).abs().max() <= 2e-3 * want.abs().max()
            if kind == "qwen2" and module in _ATTN:
                assert torch.equal(values(tensors[f"blk.{i}.attn_{module[-6]}.bias"]), hf.bias.detach())


def byte_fallback_tokenizer() -> PreTrainedTokenizerFast:
    """A SentencePiece-style BPE as transformers converts Llama-2's: ▁ for spaces, <0xXX> byte tokens in the
    vocabulary, <unk> <s> </s> special, <s> first."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers

    specials = ["<unk>", "<s>", "</s>", *(f"<0x{i:02X}>" for i in range(256))]
    trained = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    trained.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trained.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=330, special_tokens=specials))
    spec = json.loads(trained.to_str())["model"]
    merges = [tuple(m) for m in spec["merges"]]
    tok = Tokenizer(models.BPE(spec["vocab"], merges, byte_fallback=True, unk_token="<unk>"))  # bytes: plain vocab
    tok.normalizer = trained.normalizer
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_a_byte_fallback_bpe_becomes_llama_cpps_sentencepiece_tokenizer(tmp_path):
    tok = byte_fallback_tokenizer()
    kv, _ = read(hf_qlimit.export(model("llama", vocab=352), tmp_path, format="gguf", tokenizer=tok))
    own = tok.convert_ids_to_tokens(list(range(len(tok))))
    tokens, kinds, scores = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"], kv["tokenizer.ggml.scores"]
    assert kv["tokenizer.ggml.model"] == "llama" and "tokenizer.ggml.merges" not in kv
    assert tokens[: len(own)] == own and len(tokens) == 352 and kv["tokenizer.ggml.add_space_prefix"]
    assert kinds[:3] == [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    assert set(kinds[3:259]) == {gguf.TokenType.BYTE} and set(kinds[len(own) :]) == {gguf.TokenType.UNUSED}
    # llama.cpp merges the pair of highest score first, the BPE the merge of lowest rank: score = -rank
    vocab = tok.get_vocab()
    first = {}
    for rank, (a, b) in enumerate(json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]):
        first.setdefault(vocab[a + b], rank)
    assert first and all(scores[i] == -rank for i, rank in first.items())
    assert max(scores[i] for i in range(len(own)) if i not in first) < -max(first.values())
    assert (kv["tokenizer.ggml.unknown_token_id"], kv["tokenizer.ggml.add_bos_token"]) == (0, True)


def test_a_full_precision_tied_head_is_written_once(tmp_path):
    net = model("llama", tie=True, first_last_bits=None)  # the head and embedding stay float, one Parameter
    assert net.lm_head.weight is net.model.embed_tokens.weight
    _, tensors = read(hf_qlimit.export(net, tmp_path, format="gguf", tokenizer=tokenizer()))
    assert "output.weight" not in tensors
    assert torch.equal(values(tensors["token_embd.weight"]), net.model.embed_tokens.weight.detach())


def test_what_goes_in_as_float32_is_said_with_the_reason(tmp_path):
    from transformers.testing_utils import CaptureLogger, LoggingLevel
    from transformers.utils import logging

    logger = logging.get_logger("hf_qlimit.export.gguf")
    with CaptureLogger(logger) as captured:  # the embedding and head: 8-bit asymmetric per-row grids
        hf_qlimit.export(model("llama", tie=False), tmp_path / "a", format="gguf", tokenizer=tokenizer())
    assert "['model.embed_tokens', 'lm_head']: 8-bit asymmetric has no GGUF type" in captured.out
    with LoggingLevel(logging.INFO), CaptureLogger(logger) as captured:
        hf_qlimit.export(
            model("llama", False, first_last_bits=None), tmp_path / "b", format="gguf", tokenizer=tokenizer()
        )
    assert "Not quantized, written as float32 (their exact values): ['model.embed_tokens', 'lm_head']" in captured.out


def test_gemma_refuses_a_head_other_than_its_embedding(tmp_path):
    with pytest.raises(ExportError, match="reads the LM head from the token embedding"):
        hf_qlimit.export(model("gemma", tie=False), tmp_path, format="gguf", tokenizer=tokenizer())


def test_refusals(tmp_path):
    llama = model("llama")
    with pytest.raises(ExportError, match="cannot run a GGUF without its tokenizer"):
        hf_qlimit.export(llama, tmp_path / "a", format="gguf")
    with pytest.raises(ExportError, match=r"tokenizer has \d+ tokens but the embedding 96 rows"):
        hf_qlimit.export(
            llama, tmp_path / "b", format="gguf", tokenizer=tokenizer([*CORPUS, "jumbled zebras vex; pyx kvetch"], 100)
        )
    with pytest.raises(ExportError, match="weight-only"):
        hf_qlimit.export(
            model("llama", act_bits=8, transforms=[]), tmp_path / "c", format="gguf", tokenizer=tokenizer()
        )
    opt = AutoModelForCausalLM.from_config(AutoConfig.for_model("opt", hidden_size=32, ffn_dim=64,
        num_hidden_layers=1, num_attention_heads=2, word_embed_proj_dim=32, vocab_size=VOCAB))  # fmt: skip
    with pytest.raises(ExportError, match=r"model type 'opt'.*supported: \['gemma'"):
        hf_qlimit.export(opt, tmp_path / "d", format="gguf", tokenizer=tokenizer())
    assert not (tmp_path / "a" / "model.gguf").exists()


def _retagged(source, out, pre: str) -> None:
    """`source` (a GGUF of float tensors) with tokenizer.ggml.pre = `pre`: a source a rebuild cannot reproduce."""
    from hf_qlimit.export.gguf_tokenizer import copy_keys

    reader = gguf.GGUFReader(str(source))
    writer = gguf.GGUFWriter(str(out), "llama")
    for prefix in ("llama.", "tokenizer."):
        copy_keys(reader, writer, prefix)
    writer.add_tokenizer_pre(pre)  # overwrites the copied "default"
    for t in reader.tensors:
        writer.add_tensor(t.name, np.array(t.data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_a_model_converted_from_gguf_keeps_its_source_tokenizer_keys(tmp_path):
    from hf_qlimit.cli.gguf_to_hf import convert_gguf_to_hf
    from hf_qlimit.export.common import copy_tokenizer

    first = hf_qlimit.export(build("llama", tie=True), tmp_path / "first", format="gguf", tokenizer=tokenizer())
    _retagged(first, tmp_path / "source.gguf", pre="smollm")
    source_kv, _ = read(tmp_path / "source.gguf")
    source_tok = {k: v for k, v in source_kv.items() if k.startswith("tokenizer.")}
    hf = convert_gguf_to_hf(tmp_path / "source.gguf", tmp_path / "hf")
    assert json.loads((hf / "gguf_source.json").read_text())["tokenizer_keys"] == "tokenizer.gguf"
    sidecar, sidecar_tensors = read(hf / "tokenizer.gguf")
    assert {k: v for k, v in sidecar.items() if k.startswith("tokenizer.")} == source_tok and not sidecar_tensors

    calib = [{"input_ids": torch.randint(3, 50, (16,))} for _ in range(4)]
    quantized = AutoModelForCausalLM.from_pretrained(hf).quantize_qlimit(
        calib, QLimitConfig(weight_bits=4, act_bits=None, group_size=32, method="rtn", num_samples=4)
    )
    quantized.save_pretrained(tmp_path / "q")
    copy_tokenizer(hf, tmp_path / "q")  # tokenizer files and the sidecar
    kv, _ = read(hf_qlimit.export(tmp_path / "q", tmp_path / "out", format="gguf"))
    assert {k: v for k, v in kv.items() if k.startswith("tokenizer.")} == source_tok  # "smollm" kept
    assert (tmp_path / "out" / "tokenizer.gguf").is_file()

    # a sidecar whose tokens are not those of the tokenizer beside it is not trusted: the keys are rebuilt
    other = tokenizer(["other words entirely: jumbled zebras vex"] * 20)
    other.save_pretrained(tmp_path / "other")
    shutil.copy(hf / "tokenizer.gguf", tmp_path / "other")
    kv, _ = read(hf_qlimit.export(quantized, tmp_path / "o", format="gguf", tokenizer=tmp_path / "other"))
    assert kv["tokenizer.ggml.pre"] == "default"
    assert kv["tokenizer.ggml.tokens"][: len(other)] == other.convert_ids_to_tokens(list(range(len(other))))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
def test_transformers_reads_the_file_back_with_hf_qlimits_logits(tmp_path, kind):
    quant = {"weight_bits": 8, "weight_sym": True} if kind == "Q8_0" else {}
    net = model("llama", tie=False, **quant)
    hf_qlimit.export(net, tmp_path, format="gguf", tokenizer=tokenizer())
    ids = torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(5))
    torch.save(ids, tmp_path / "ids.pt")
    hf_qlimit.set_inference_mode(net, "dequantize")
    with torch.no_grad():
        ref = net(input_ids=ids).logits
    script = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        folder = {str(tmp_path)!r}
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file="model.gguf", dtype=torch.float32)
        with torch.no_grad():
            torch.save(model.eval()(input_ids=torch.load(folder + "/ids.pt")).logits, folder + "/got.pt")
        assert "hf_qlimit" not in sys.modules
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    got = torch.load(tmp_path / "got.pt")
    # float16 scales and Q4_1 offsets (m = -s·z: up to 15 steps) round by ~5e-4 of themselves, through 2 layers
    assert (got - ref).abs().max() <= 5e-3 * ref.abs().max()
