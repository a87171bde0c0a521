"""The "qlimit" attention function on every model type of the zoo: with its matmul quantizers attached but
disabled it gives eager attention's logits (Gemma 2's softcap and T5's position bias included), its extras match
the families' own eager functions, unknown arguments are refused, and `record_attention_calls` finds the modules
that call the attention interface (none for DeBERTa-v2, which is then refused)."""

from __future__ import annotations

import pytest
import torch
from model_zoo import OWN_ATTENTION, ZOO, eval_batch, logits
from torch import nn

from hf_qlimit.calibration.quant_state import quant_state
from hf_qlimit.hf.surgery import convert_model
from hf_qlimit.nn import attention
from hf_qlimit.nn.attention import (
    ATTENTION_ATTR,
    AttentionQuantizers,
    attention_calls,
    qlimit_attention_forward,
    register_attention,
)
from hf_qlimit.nn.attention_probe import attention_refusal, record_attention_calls, use_qlimit_attention

NO_INTERFACE = OWN_ATTENTION  # DeBERTa-v2 (its own disentangled attention), Falcon before transformers 5.25
TOLERANCE = 1e-5


def _probe(model: nn.Module, batch: dict) -> list[str]:
    with record_attention_calls(model) as found:
        logits(model, batch)
    return found.names


def _qlimit_logits(model: nn.Module, batch: dict) -> tuple[torch.Tensor, set[str]]:
    """Logits with "qlimit" attention and 8-bit attention quantizers attached but disabled, and the names of the
    modules whose quantizers the forward pass reached."""
    reached: set[str] = set()
    for name in _probe(model, batch):
        quantizers = AttentionQuantizers(8)
        quantizers.probs.register_forward_hook(lambda *_, name=name: reached.add(name))
        model.get_submodule(name).add_module(ATTENTION_ATTR, quantizers)
    use_qlimit_attention(model)
    with quant_state(model, weights=False, acts=False):
        return logits(model, batch), reached


@pytest.mark.parametrize("model_type", [t for t in ZOO if t not in NO_INTERFACE])
def test_qlimit_attention_with_disabled_quantizers_equals_eager(model_type):
    model, batch = ZOO[model_type](), eval_batch(model_type)
    expected = logits(model, batch)
    got, reached = _qlimit_logits(model, batch)
    attached = {n for n, m in model.named_modules() if isinstance(m, AttentionQuantizers)}
    assert attached and reached == {n.rpartition(".")[0] for n in attached}  # every attention went through it
    assert (got - expected).abs().max().item() < TOLERANCE


@pytest.mark.parametrize(("model_type", "extra"), [("gemma2", "softcap"), ("t5", "position_bias")])
def test_dropping_the_extra_breaks_the_equality(model_type, extra, monkeypatch):
    """The equality above fails when the function loses Gemma 2's softcap or T5's position bias."""

    def without_extra(*args, **kwargs):
        kwargs.pop(extra)
        return qlimit_attention_forward(*args, **kwargs)

    model, batch = ZOO[model_type](), eval_batch(model_type)
    expected = logits(model, batch)
    monkeypatch.setattr(attention, "qlimit_attention_forward", without_extra)  # what register_attention registers
    try:
        got, _ = _qlimit_logits(model, batch)
    finally:
        monkeypatch.undo()
        register_attention()
    assert (got - expected).abs().max().item() > 10 * TOLERANCE


def test_gpt_oss_attention_sinks_equal_eager():
    """gpt-oss (outside the zoo) passes its per-head sink logits as `s_aux`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "gpt_oss", vocab_size=128, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2,
        layer_types=["sliding_attention", "full_attention"], sliding_window=4,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    for layer in model.model.layers:
        nn.init.normal_(layer.self_attn.sinks, std=2.0)  # initialised at 0: make them matter
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    expected = logits(model, batch)
    got, reached = _qlimit_logits(model, batch)
    assert len(reached) == 2 and (got - expected).abs().max().item() < TOLERANCE


class _Attention(nn.Module):
    """What the families' eager functions read from their module."""

    def __init__(self, heads: int, head_dim: int = 8) -> None:
        super().__init__()
        self.num_key_value_groups, self.head_dim = 1, head_dim
        self.sinks = nn.Parameter(torch.randn(heads))


def _qkv(batch: int = 2, heads: int = 4, tokens: int = 5, dim: int = 8) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(batch, heads, tokens, dim, generator=g) for _ in range(3)]


def _causal_mask(tokens: int = 5) -> torch.Tensor:
    return torch.full((tokens, tokens), torch.finfo(torch.float32).min).triu(1)[None, None]


def _extras(module: _Attention) -> dict[str, tuple[str, dict]]:
    """Family -> (its modeling module, the extra arguments it passes)."""
    g = torch.Generator().manual_seed(1)
    return {
        "gemma2": ("transformers.models.gemma2.modeling_gemma2", {"softcap": 2.0, "scaling": 0.5}),
        "t5": (
            "transformers.models.t5.modeling_t5",
            {"position_bias": torch.randn(1, 4, 5, 5, generator=g), "scaling": 1.0},
        ),
        "t5 (scaling None)": ("transformers.models.t5.modeling_t5", {}),
        "gpt_oss": ("transformers.models.gpt_oss.modeling_gpt_oss", {"s_aux": module.sinks, "scaling": 0.3}),
        "inkling2": (
            "transformers.models.inkling2.modeling_inkling2",
            {"sinks": torch.randn(2, 4, 5, 1, generator=g), "scaling": 0.3},
        ),
    }


@pytest.mark.parametrize("family", ["gemma2", "t5", "t5 (scaling None)", "gpt_oss", "inkling2"])
@pytest.mark.parametrize("training", [False, True])
def test_extras_match_the_family_eager_function(family, training):
    module = _Attention(heads=4).train(training)
    path, extras = _extras(module)[family]
    eager = pytest.importorskip(path).eager_attention_forward
    q, k, v = _qkv()
    results = []
    for function in (eager, qlimit_attention_forward):
        torch.manual_seed(0)  # the same dropout mask
        results.append(function(module, q, k, v, _causal_mask(), dropout=0.3 if training else 0.0, **extras))
    (want, want_p), (got, got_p) = results
    assert torch.allclose(got, want, atol=1e-6, rtol=0) and torch.allclose(got_p, want_p, atol=1e-6, rtol=0)


def test_unknown_argument_is_refused_and_none_is_not():
    module, (q, k, v) = _Attention(heads=4), _qkv()
    with pytest.raises(ValueError, match=r"_Attention .*\['indices'\].*quantize_attention=False"):
        qlimit_attention_forward(module, q, k, v, None, indices=torch.zeros(1))
    out, _ = qlimit_attention_forward(module, q, k, v, None, indices=None, sliding_window=4, use_cache=True)
    assert out.shape == (2, 5, 4, 8)


def test_probe_runs_the_family_eager_function_for_unknown_arguments():
    """While probing, a call with an unknown argument stays exact (the family's own eager function) and is
    reported; outside the probe it raises."""
    model = ZOO["llama"]()
    attention = model.model.layers[0].self_attn
    q, k, v = _qkv(heads=4)
    k, v = k[:, :2], v[:, :2]  # grouped-query attention: 2 KV heads
    eager = pytest.importorskip("transformers.models.llama.modeling_llama").eager_attention_forward
    want, _ = eager(attention, q, k, v, _causal_mask(), scaling=0.3)
    with attention_calls() as calls:
        got, _ = qlimit_attention_forward(attention, q, k, v, _causal_mask(), scaling=0.3, indices=torch.ones(1))
    assert torch.equal(got, want) and calls == [(attention, ("indices",))]


def _names(model_type: str) -> list[str]:
    return _probe(ZOO[model_type](), eval_batch(model_type))


def test_probe_finds_the_attention_modules():
    assert _names("llama") == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert _names("bert") == ["bert.encoder.layer.0.attention.self", "bert.encoder.layer.1.attention.self"]
    assert _names("gemma2") == [f"model.layers.{i}.self_attn" for i in range(3)]
    encoder = [f"encoder.block.{i}.layer.0.SelfAttention" for i in range(2)]
    decoder = [
        f"decoder.block.{i}.layer.{j}.{kind}"
        for i in range(2)
        for j, kind in ((0, "SelfAttention"), (1, "EncDecAttention"))
    ]
    assert _names("t5") == encoder + decoder


def test_probe_counts_every_call_of_a_shared_layer():
    model = ZOO["albert"]()
    with record_attention_calls(model) as found:
        logits(model, eval_batch("albert"))
    assert found.calls == ["albert.encoder.albert_layer_groups.0.albert_layers.0.attention"] * 2
    assert attention_refusal(model, found) is None


def test_probe_restores_every_submodel_implementation():
    model = ZOO["t5"]()
    model.decoder.config._attn_implementation = "sdpa"
    _probe(model, eval_batch("t5"))
    implementations = [c._attn_implementation for c in (model.config, model.encoder.config, model.decoder.config)]
    assert implementations == ["eager", "eager", "sdpa"]
    use_qlimit_attention(model)
    _probe(model, eval_batch("t5"))  # a model on "qlimit" stays on it
    assert {m.config._attn_implementation for m in (model, model.encoder, model.decoder)} == {"qlimit"}


def test_deberta_has_no_attention_calls_and_is_refused():
    model = ZOO["deberta-v2"]()
    with record_attention_calls(model) as found:
        logits(model, eval_batch("deberta-v2"))
    assert found.calls == [] and found.unsupported == [""]
    error = attention_refusal(model, found)
    assert error is not None
    assert "DebertaV2ForSequenceClassification" in str(error) and "quantize_attention=False" in str(error)
    with pytest.raises(ValueError, match="own code"):
        use_qlimit_attention(model)


def test_conversion_refuses_attention_quantizers_on_deberta():
    """A layer config with attention quantizers (a forged checkpoint) cannot be put on DeBERTa-v2 silently."""
    from hf_qlimit import QLimitConfig

    model = ZOO["deberta-v2"]()
    spec = {"deberta.encoder.layer.0.attention.self": {"kind": "attention", "a": 8}}
    with pytest.raises(ValueError, match="quantize_attention=False"):
        convert_model(model, spec, QLimitConfig(weight_bits=4, act_bits=8), frozen=False)
