"""Decoder LMs (Llama family and OPT) on tiny random models: the adapter, the block inputs the generic pipeline
captures (rotary position embeddings, masks), grouped-query attention, tied embeddings, and the quantize -> save ->
reload-in-a-fresh-process round trip of every mode (weight-only with groups, W8A8, W4A8)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import DECODER_VOCAB, STATIC_ACTIVATIONS, decoder_calib, tiny_decoder
from transformers import AutoModelForCausalLM, Cache

import hf_qlimit
from hf_qlimit import QLimitConfig
from hf_qlimit.calibration.block_inputs import capture_block_inputs, run_block
from hf_qlimit.models import get_adapter
from hf_qlimit.nn.attention import qlimit_attention_forward
from hf_qlimit.nn.embedding import QuantEmbedding
from hf_qlimit.nn.modules import QuantLinear


def qconfig(**kwargs) -> QLimitConfig:
    base = {"weight_bits": 4, "act_bits": 8, "method": "qdrop", "num_samples": 8, "batch_size": 4, "iters": 4}
    base.update(STATIC_ACTIVATIONS)
    return QLimitConfig(**{**base, **kwargs})


def test_llama_family_adapter_and_layer_config():
    assert {"llama", "qwen2", "mistral", "opt"} <= set(hf_qlimit.supported_model_types())
    model = tiny_decoder("llama")
    plan = get_adapter(model).layer_config(model, qconfig())
    assert plan["model.embed_tokens"] == {"kind": "embedding", "w": 8}
    assert plan["lm_head"] == {"kind": "linear", "w": 8, "a": 8}  # first/last layers at first_last_bits
    for i in range(2):
        assert plan[f"model.layers.{i}.self_attn"] == {"kind": "attention", "a": 8}
        for proj in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ):
            assert plan[f"model.layers.{i}.{proj}"] == {"kind": "linear", "w": 4, "a": 8}
    assert len(plan) == 2 + 2 * 8
    weight_only = get_adapter(model).layer_config(model, qconfig(act_bits=None))
    assert not any(spec["kind"] == "attention" for spec in weight_only.values())
    assert weight_only["lm_head"] == {"kind": "linear", "w": 8, "a": None}


@pytest.mark.parametrize("attn", ["sdpa", "qlimit"])
@pytest.mark.parametrize("padded", ["all", "first", "second", "none"])
def test_captured_block_inputs_reproduce_the_first_block(attn, padded):
    """Running block 0 on what capture_block_inputs recorded (rotary cos/sin, position ids, mask, cache flags)
    gives what block 0 computes inside the full forward pass. With sdpa an unpadded batch has no mask at all
    and a padded one has a tensor: mixing both must work."""
    model = tiny_decoder("llama")
    if attn == "qlimit":
        model.set_attn_implementation("qlimit")
    ids = torch.randint(0, DECODER_VOCAB, (4, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    if padded in ("all", "first"):
        mask[1, 7:] = 0  # right padding, as in calibration batches
    if padded in ("all", "second"):
        mask[2, 6:] = 0
    batches = [{"input_ids": ids[:2], "attention_mask": mask[:2]}, {"input_ids": ids[2:], "attention_mask": mask[2:]}]
    block = model.model.layers[0]
    seen = []
    handle = block.register_forward_hook(lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        for b in batches:
            model(**b, use_cache=False)
    handle.remove()
    hidden, inputs = capture_block_inputs(model, block, batches, torch.device("cpu"))
    assert [h.shape for h in hidden] == [(2, 10, 32), (2, 10, 32)]
    for j in range(2):
        _, kwargs = inputs.get(j, torch.device("cpu"))
        cos, sin = kwargs["position_embeddings"]
        assert cos.shape == sin.shape == (1, 10, 8)  # rotary tables are shared by the batch
        assert kwargs["position_ids"].shape == (1, 10)
        # No KV cache may reach the block, whatever transformers calls it (past_key_values <= 5.23, cache >= 5.24).
        assert kwargs["use_cache"] is False
        assert not any(isinstance(v, Cache) for v in kwargs.values())
        if attn == "qlimit":  # eager masks are always materialised
            assert kwargs["attention_mask"].shape == (2, 1, 10, 10)
    out = run_block(block, hidden, inputs, torch.device("cpu"))
    for got, expected in zip(out, seen):
        assert torch.allclose(got, expected, atol=1e-6)


def test_qlimit_attention_matches_eager_with_grouped_query_attention():
    from transformers.models.llama.modeling_llama import eager_attention_forward

    model = tiny_decoder("llama")
    attn = model.model.layers[0].self_attn
    assert attn.num_key_value_groups == 2
    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(2, 4, 5, 8, generator=g),
        torch.randn(2, 2, 5, 8, generator=g),
        torch.randn(2, 2, 5, 8, generator=g),
    )
    mask = torch.triu(torch.full((5, 5), float("-inf")), 1).expand(2, 1, 5, 5)
    ours, _ = qlimit_attention_forward(attn, q, k, v, mask, scaling=attn.scaling)
    ref, _ = eager_attention_forward(attn, q, k, v, mask, scaling=attn.scaling)
    assert torch.allclose(ours, ref, atol=1e-6)
    # Swapping two KV heads must change the output: each query head group reads its own KV head.
    swapped, _ = qlimit_attention_forward(attn, q, k.flip(1), v.flip(1), mask, scaling=attn.scaling)
    assert not torch.allclose(swapped, ref, atol=1e-3)


# name -> (architecture, QLimitConfig overrides)
VARIANTS = {
    "llama-w4a8-qdrop": ("llama", {}),
    "llama-w8a8-rtn": ("llama", {"weight_bits": 8, "method": "rtn"}),
    "llama-w4a16-g16-qdrop": ("llama", {"act_bits": None, "group_size": 16}),
    "llama-w3a16-g16-rtn": ("llama", {"weight_bits": 3, "act_bits": None, "group_size": 16, "method": "rtn"}),
    "qwen2-w4a8-brecq": ("qwen2", {"method": "brecq"}),
    "mistral-w4a8-rtn": ("mistral", {"method": "rtn"}),
    "opt-w4a8-qdrop": ("opt", {}),
    "opt-w4a16-g16-rtn": ("opt", {"act_bits": None, "group_size": 16, "method": "rtn"}),
}

RELOAD = textwrap.dedent(
    """
    import json, sys, torch
    import hf_qlimit
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM
    out = {}
    for path in sys.argv[1:]:
        ref = torch.load(f"{path}/expected.pt")
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        with torch.no_grad():
            logits = model(ref["ids"]).logits
        gen = model.generate(ref["ids"][:1, :4], max_new_tokens=6, do_sample=False, min_new_tokens=6)
        out[path] = {"equal": torch.equal(logits, ref["logits"]), "generate": torch.equal(gen, ref["generate"]),
                     "tied": model.get_input_embeddings() is model.get_output_embeddings(),
                     "attn": model.config._attn_implementation}
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def quantized_checkpoints(tmp_path_factory):
    """Every variant quantized and saved with its logits and greedy generation."""
    root = tmp_path_factory.mktemp("decoders")
    ids = torch.randint(0, DECODER_VOCAB, (2, 12), generator=torch.Generator().manual_seed(7))
    infos = {}
    for name, (arch, overrides) in VARIANTS.items():
        model = tiny_decoder(arch)
        with torch.no_grad():
            fp_logits = model(ids).logits
        model.quantize_qlimit(decoder_calib(), qconfig(**overrides))
        with torch.no_grad():
            logits = model(ids).logits
        gen = model.generate(ids[:1, :4], max_new_tokens=6, do_sample=False, min_new_tokens=6)
        model.save_pretrained(root / name)
        torch.save({"ids": ids, "logits": logits, "generate": gen}, root / name / "expected.pt")
        infos[name] = {"model": model, "fp_logits": fp_logits, "logits": logits, "path": root / name}
    return infos


@pytest.fixture(scope="module")
def reloaded_in_a_fresh_process(quantized_checkpoints):
    """What every saved variant gives when reloaded in ONE fresh process, by path."""
    paths = [str(info["path"]) for info in quantized_checkpoints.values()]
    proc = subprocess.run(
        [sys.executable, "-c", RELOAD, *paths], capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(VARIANTS))
def test_quantize_save_reload_in_a_fresh_process_gives_identical_logits(
    quantized_checkpoints, reloaded_in_a_fresh_process, name
):
    info = quantized_checkpoints[name]
    fresh = reloaded_in_a_fresh_process[str(info["path"])]
    assert fresh["equal"], "logits of the reloaded model differ from those of the in-memory quantized model"
    assert fresh["generate"], "greedy generate() of the reloaded model differs"
    assert not fresh["tied"]  # quantized embedding and head each keep their own codes
    saved = json.loads((info["path"] / "config.json").read_text())
    assert saved["tie_word_embeddings"] is False
    act_bits = saved["quantization_config"]["act_bits"]
    assert fresh["attn"] == ("qlimit" if act_bits else "sdpa")
    # Quantization happened, and the model still computes roughly the same function.
    assert not torch.equal(info["logits"], info["fp_logits"])
    rel = (info["logits"] - info["fp_logits"]).norm() / info["fp_logits"].norm()
    assert rel < 0.5, f"relative logit error {rel:.3f}"


def test_first_and_last_layers_stay_at_8_bits_and_untied(quantized_checkpoints):
    model = quantized_checkpoints["llama-w4a8-qdrop"]["model"]
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(emb, QuantEmbedding) and isinstance(head, QuantLinear)
    assert emb.weight_quantizer.bits == 8 and head.weight_quantizer.bits == 8 and head.input_quantizer.bits == 8
    assert emb.packed_weight().data_ptr() != head.packed_weight().data_ptr()
    block_linear = model.model.layers[0].mlp.down_proj
    assert block_linear.weight_quantizer.bits == 4 and block_linear.input_quantizer.bits == 8


def test_weight_only_groups_have_one_scale_per_group(quantized_checkpoints):
    model = quantized_checkpoints["llama-w4a16-g16-qdrop"]["model"]
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear) and name.startswith("model.layers."):
            assert module.input_quantizer is None
            assert module.weight_quantizer.scale.shape == (module.out_features, module.in_features // 16)
            assert module.weight_quantizer.group_size == 16
    assert not hasattr(model.model.layers[0].self_attn, "qlimit_attention")
    # 3-bit groups: 3 bits per code, packed
    w3 = quantized_checkpoints["llama-w3a16-g16-rtn"]["model"].model.layers[0].mlp.up_proj
    assert w3.packed_weight().dtype == torch.uint8 and w3.packed_weight().numel() == 64 * ((32 * 3 + 7) // 8)


def test_generate_with_cache_equals_generate_without(quantized_checkpoints):
    """Quantized K/V enter the cache before the (fixed-range) key/value quantizers, so caching changes nothing."""
    model = AutoModelForCausalLM.from_pretrained(quantized_checkpoints["llama-w4a8-qdrop"]["path"]).eval()
    prompt = torch.randint(0, DECODER_VOCAB, (1, 5), generator=torch.Generator().manual_seed(3))
    cached = model.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False, use_cache=True)
    uncached = model.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_untied_model_keeps_two_heads_and_fp_first_last_layers_are_left_alone():
    model = tiny_decoder("llama", tie=False)
    model.quantize_qlimit(decoder_calib(), qconfig(method="rtn", first_last_bits=None))
    assert type(model.get_input_embeddings()) is torch.nn.Embedding
    assert type(model.get_output_embeddings()) is torch.nn.Linear
    assert isinstance(model.model.layers[1].mlp.gate_proj, QuantLinear)
