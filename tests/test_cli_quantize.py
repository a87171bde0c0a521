"""`hf-qlimit quantize`: the one command that loads, quantizes, saves, exports and summarises, on a tiny random
Llama (and BERT) with a word-level tokenizer built offline and a small text file."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import DECODER_VOCAB, VOCAB, logits, tiny_bert, tiny_decoder
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

import hf_qlimit  # noqa: F401  (registers the qlimit quantizer for from_pretrained)
from hf_qlimit.cli.main import main
from hf_qlimit.cli.model_card import CARD_FILE, SUMMARY_FILE
from hf_qlimit.cli.quantize import parse, prepare

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--method", "rtn", "--seq-len", "16", "--num-samples", "4", "--eval-windows", "2"]


def text_lines(lines: int = 60) -> list[str]:
    """Lines of 12 "words" w0...w49 in a repeating pattern with some noise."""
    rng = random.Random(0)
    return [" ".join(f"w{(i * 3 + j + rng.randint(0, 2)) % 50}" for j in range(12)) for i in range(lines)]


def save_tokenizer(folder: Path, vocab_size: int) -> None:
    """A byte-level BPE (llama.cpp's "gpt2" tokenizer model, so that GGUF export can write it) trained on
    `text_lines()` to at most `vocab_size` tokens: its ids fit the model's embedding."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>"], show_progress=False)
    tok.train_from_iterator(text_lines(), trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<s>").save_pretrained(folder)


def write_text(path: Path) -> Path:
    path.write_text("\n".join(text_lines()) + "\n")
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_decoder("llama").save_pretrained(folder)
    save_tokenizer(folder, DECODER_VOCAB)
    write_text(folder / "calib.txt")
    return folder


@pytest.fixture(scope="module")
def gguf_run(llama_dir, tmp_path_factory) -> tuple[list[str], Path]:
    """One in-process run: GGUF's Q4_0 grid, exported to GGUF; (its arguments, its output folder)."""
    pytest.importorskip("gguf")
    out = tmp_path_factory.mktemp("runs") / "tiny-q4_0"
    args = [str(llama_dir), "--format", "gguf:q4_0", "--calib", str(llama_dir / "calib.txt"), "--output", str(out)]
    args += [*FAST, "--export", "gguf"]
    assert main(["quantize", *args]) == 0
    return args, out


def test_the_folder_reloads_to_the_logits_of_the_model_quantized_in_memory(gguf_run):
    args, out = gguf_run
    job = prepare(*parse(args))  # the same config and calibration windows the command used
    # the perplexity windows are held out: the two after the four calibration ones
    text = "\n\n".join(f"{line}\n" for line in text_lines())  # run_ppl.py's reading: lines kept, "\n\n" between
    ids = job.tokenizer(text, return_tensors="pt").input_ids[0]
    assert torch.equal(torch.stack([c["input_ids"] for c in job.data.calib]).flatten(), ids[:64])
    assert torch.equal(job.data.eval.flatten(), ids[64:96])
    model = AutoModelForCausalLM.from_pretrained(args[0])
    model.quantize_qlimit(job.data.calib, job.config)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    ids = job.data.eval[:1]
    assert reloaded.config.quantization_config.weight_format == "gguf:q4_0"
    assert torch.equal(logits(reloaded, ids), logits(model, ids))
    assert not torch.equal(logits(reloaded, ids), logits(AutoModelForCausalLM.from_pretrained(args[0]), ids))


def test_the_summary_has_both_perplexities_sizes_and_times(gguf_run):
    _, out = gguf_run
    summary = json.loads((out / SUMMARY_FILE).read_text())
    ppl = summary["perplexity"]
    assert ppl["fp"]["windows"] == ppl["quantized"]["windows"] == 2
    assert ppl["fp"]["ppl"] > 1 and ppl["quantized"]["ppl"] > 1 and ppl["fp"]["ppl"] != ppl["quantized"]["ppl"]
    # held out: the 2 evaluation windows follow the 4 calibration ones
    assert summary["data"]["calib_windows"] == 4 and "after the calibration" in summary["data"]["eval"]
    sizes = summary["sizes"]
    assert sizes["source_basis"] == "weight files" and sizes["source_bytes"] > sizes["saved_bytes"] > 0
    assert sizes["export_bytes"] == (out / "gguf" / "model.gguf").stat().st_size
    timings = summary["timings_s"]
    assert timings["total_s"] >= timings["quantize_s"] + timings["fp_eval_s"] + timings["quantized_eval_s"]
    # what was asked (act_bits None: the command's default) and what the GGUF type fixed (group, symmetry)
    assert summary["settings"] == {
        "weight_format": "gguf:q4_0",
        "group_size": 32,
        "weight_sym": True,
        "act_bits": None,
        "method": "rtn",
        "num_samples": 4,
        "max_length": 16,
    }


def test_the_model_card_names_the_settings_figures_and_how_to_run_it(gguf_run):
    _, out = gguf_run
    card = (out / CARD_FILE).read_text()
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["config_summary"] in card and "`weight_format='gguf:q4_0'`" in card
    assert f"{summary['perplexity']['quantized']['ppl']:.3f}" in card
    assert "AutoModelForCausalLM.from_pretrained" in card and "llama-cli -m" in card


def test_a_bert_quantizes_and_its_summary_says_perplexity_is_skipped(tmp_path, capsys):
    folder = tmp_path / "bert"
    tiny_bert().save_pretrained(folder)
    save_tokenizer(folder, VOCAB)
    (folder / "tokenizer.gguf").write_bytes(b"GGUF keys")  # a tokenizer file save_pretrained does not write
    out = tmp_path / "out"
    text = write_text(tmp_path / "calib.txt")
    assert main(["quantize", str(folder), "--calib", str(text), "--output", str(out), *FAST]) == 0
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["perplexity"] == {"skipped": "'bert' is not a causal LM"}
    assert "perplexity  skipped: 'bert' is not a causal LM" in capsys.readouterr().out
    assert "BertForSequenceClassification.from_pretrained" in (out / CARD_FILE).read_text()
    assert (out / "tokenizer.gguf").read_bytes() == b"GGUF keys"

    # GGUF is for causal LMs: refused before anything is written
    refused = tmp_path / "refused"
    args = [str(folder), "--calib", str(text), "--output", str(refused), "--format", "gguf:q4_0"]
    assert main(["quantize", *args]) == 2
    assert "is not one. Drop --format" in capsys.readouterr().err and not refused.exists()


def test_a_dataset_folder_calibrates_like_the_text_file(llama_dir, tmp_path):
    """`--calib` a folder saved with `datasets`' save_to_disk, its column named by --text-column."""
    import datasets

    datasets.Dataset.from_dict({"body": [f"{line}\n" for line in text_lines()]}).save_to_disk(tmp_path / "ds")
    common = [str(llama_dir), *FAST, "--eval-windows", "1"]
    from_file = prepare(*parse([*common, "--calib", str(llama_dir / "calib.txt"), "--output", str(tmp_path / "a")]))
    args = [*common, "--calib", str(tmp_path / "ds"), "--text-column", "body", "--output", str(tmp_path / "out")]
    from_dataset = prepare(*parse(args))
    assert torch.equal(from_dataset.data.eval, from_file.data.eval)
    assert main(["quantize", *args]) == 0
    summary = json.loads((tmp_path / "out" / SUMMARY_FILE).read_text())
    assert summary["data"]["calib"] == f"{tmp_path / 'ds'}:train[body]"
    assert main(["quantize", *args[:-4], "--text-column", "text", "--output", str(tmp_path / "x")]) == 2


@pytest.mark.parametrize(
    "change, message",
    [
        (["--calib", "missing.txt"], "No such file or folder: 'missing.txt'"),
        (["--bits", "9"], "weight_bits"),
        (["--format", "gguf:q4_0", "--bits", "8"], "contradicts weight_bits=8"),
        (["--act-bits", "8", "--export", "gguf"], "stores weights only"),
        (["--format", "gguf:q4_k", "--export", "compressed-tensors"], "gguf:q4_k add a float offset"),
        (["--format", "gguf:q4_1", "--first-last-bits", "2", "--export", "compressed-tensors"], "gguf:q2_k add"),
        (["--num-samples", "1000"], "fewer --num_samples"),
        (["--act-bits", "8", "--export", "compressed-tensors"], "Pass --transforms none to export"),
    ],
)
def test_bad_input_exits_2_with_the_fix_before_any_work(llama_dir, tmp_path, capsys, change, message):
    out = tmp_path / "out"
    args = [str(llama_dir), "--calib", str(llama_dir / "calib.txt"), "--output", str(out), *FAST, *change]
    assert main(["quantize", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("hf-qlimit quantize: error:")
    assert not out.exists()


def test_a_model_the_gguf_exporter_refuses_is_refused_before_any_work(tmp_path, capsys):
    pytest.importorskip("gguf")
    folder, out = tmp_path / "opt", tmp_path / "out"
    tiny_decoder("opt").save_pretrained(folder)  # llama.cpp has no OPT architecture
    save_tokenizer(folder, DECODER_VOCAB)
    args = [str(folder), "--calib", str(write_text(tmp_path / "calib.txt")), "--output", str(out), *FAST]
    assert main(["quantize", *args, "--export", "gguf"]) == 2
    err = capsys.readouterr().err
    assert "error: --export gguf: " in err and "'opt'" in err and not out.exists()


def test_an_unknown_export_or_command_exits_2(llama_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:  # argparse's own refusal of a choice
        main(["quantize", str(llama_dir), "--calib", "x.txt", "--output", str(tmp_path), "--export", "onnx"])
    assert exit_info.value.code == 2 and "invalid choice: 'onnx'" in capsys.readouterr().err
    assert main(["quantise"]) == 2 and "unknown command 'quantise'" in capsys.readouterr().err
    for command in ("export", "gguf-to-hf"):  # the subcommands' usage names the command typed
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert f"usage: hf-qlimit {command} " in capsys.readouterr().out


def test_the_console_script_is_declared():
    project = (ROOT / "pyproject.toml").read_text()  # no tomllib: Python 3.10 is supported
    scripts = project[project.index("[project.scripts]") :].split("\n[", 1)[0]
    assert re.search(r'^hf-qlimit = "hf_qlimit\.cli\.main:main"$', scripts, re.MULTILINE)
    assert main(["--help"]) == 0


@pytest.mark.slow
def test_the_command_runs_in_a_fresh_interpreter(llama_dir, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "hf_qlimit.cli.main", "quantize", str(llama_dir), "--bits", "4"]
    command += ["--group-size", "32", "--calib", str(llama_dir / "calib.txt"), "--output", str(out), *FAST]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    assert "perplexity  FP" in done.stdout and (out / SUMMARY_FILE).is_file()
    assert json.loads((out / "config.json").read_text())["quantization_config"]["group_size"] == 32
