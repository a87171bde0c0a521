"""AdaRound, BRECQ and QDrop on tiny models."""

from __future__ import annotations

import pytest
import torch
from helpers import calib_samples, logits, tiny_bert, tiny_opt
from transformers import AutoModelForCausalLM

from hf_qlimit import QLimitConfig
from hf_qlimit.nn.modules import QuantLinear
from hf_qlimit.quantizers import ActQuantizer, WeightQuantizer, beta_schedule

FAST = {"iters": 60, "batch_size": 8}


@pytest.mark.parametrize("method", ["adaround", "brecq", "qdrop"])
def test_reconstruction_lowers_block_error_against_rtn(method):
    model = tiny_bert()
    model.quantize_qlimit(calib_samples(24), QLimitConfig(weight_bits=2, act_bits=8, method=method, **FAST))
    errors = model.qlimit_block_errors
    assert len(errors) == 2
    for block in errors:
        assert block["mse"] < block["rtn_mse"], block


def test_hard_rounding_leaves_weights_on_the_grid():
    model = tiny_bert()
    model.quantize_qlimit(calib_samples(), QLimitConfig(weight_bits=3, act_bits=8, method="qdrop", **FAST))
    for layer in (model.bert.encoder.layer[0].attention.self.query, model.bert.encoder.layer[1].output.dense):
        q = layer.quantized_weight() / layer.weight_quantizer.scale + layer.weight_quantizer.zero.float()
        assert torch.allclose(q, q.round(), atol=1e-4)
        assert q.round().min() >= 0 and q.round().max() <= 7


def test_an_input_quantizer_no_pass_reaches_leaves_the_model_and_its_config():
    """A quantized Linear the forward pass never calls keeps no uncalibrated input quantizer, and the config
    saved with the model no longer asks for one; the pooler, reached by the final pass, keeps its own."""
    model = tiny_bert()
    model.unused = torch.nn.Linear(model.config.hidden_size, 4)
    model.quantize_qlimit(calib_samples(8), QLimitConfig(weight_bits=4, act_bits=8, method="qdrop", iters=2))
    layer_config = model.config.quantization_config.layer_config
    assert model.unused.input_quantizer is None and layer_config["unused"]["a"] is None
    assert model.bert.pooler.dense.input_quantizer is not None and layer_config["bert.pooler.dense"]["a"] == 8


def test_adaround_starts_at_the_fp_weight():
    w = torch.randn(16, 32)
    quantizer = WeightQuantizer(4, (16, 32), None, False)
    quantizer.init_range(w, 2.4)
    quantizer.begin_adaround(w)
    scale, zero = quantizer.grid()
    real = w / scale.squeeze(-1) + zero.squeeze(-1)  # position on the integer grid
    frac = real - real.floor()
    inside = (real > 0) & (real < 15) & (frac > 1e-3) & (frac < 1 - 1e-3)  # not clipped, not at the h clamp
    assert inside.float().mean() > 0.9
    assert torch.allclose(quantizer(w)[inside], w[inside], atol=1e-5)


def test_beta_anneals_after_warmup():
    assert beta_schedule(19, 100, 0.2, 20, 2) is None
    assert beta_schedule(20, 100, 0.2, 20, 2) == pytest.approx(20)
    assert beta_schedule(60, 100, 0.2, 20, 2) == pytest.approx(11)
    assert beta_schedule(100, 100, 0.2, 20, 2) == pytest.approx(2)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.75])
def test_keep_mask_keeps_at_rate_one_minus_p(p):
    from hf_qlimit.quantizers.lsq import keep_mask

    torch.manual_seed(0)
    mask = keep_mask(torch.empty(1001, 999), p)  # odd size: the last 64-bit draw is cut
    assert mask.shape == (1001, 999) and mask.dtype == torch.float32
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    assert mask.mean().item() == pytest.approx(1 - p, abs=0.003)


@pytest.mark.parametrize("bits,scale,zero", [(8, 0.02, 128), (4, 0.37, 7), (2, 0.5, 0)])
def test_act_fake_quant_gives_torchs_floats(bits, scale, zero):
    torch.manual_seed(0)
    x = 4 * torch.randn(10_000)  # wide enough to clip at both ends
    quantizer = ActQuantizer(bits)
    quantizer.scale.data.fill_(scale)
    quantizer.zero.fill_(zero)
    assert torch.equal(quantizer(x), torch.fake_quantize_per_tensor_affine(x, scale, zero, 0, 2**bits - 1))


def test_qdrop_quantizes_at_the_configured_rate():
    quantizer = ActQuantizer(4)
    quantizer.scale.data.fill_(0.37)
    quantizer.zero.fill_(7)
    x = torch.randn(200_000)
    exact = quantizer(x)
    quantizer.train()
    quantizer.drop_prob = 0.5
    torch.manual_seed(0)
    mixed = quantizer(x)
    changed = exact != x
    quantized_share = (mixed[changed] == exact[changed]).float().mean().item()
    assert quantized_share == pytest.approx(0.5, abs=0.01)


def test_reconstructed_model_reloads_identically(inputs, tmp_path):
    model = tiny_opt()
    config = QLimitConfig(weight_bits=4, act_bits=8, method="qdrop", loss="fisher", **FAST)
    model.quantize_qlimit(calib_samples(), config)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(logits(reloaded, inputs), logits(model, inputs))


def test_same_seed_gives_identical_tensors():
    states = []
    for _ in range(2):
        model = tiny_bert()
        model.quantize_qlimit(calib_samples(), QLimitConfig(weight_bits=2, act_bits=8, method="qdrop", seed=3, **FAST))
        states.append(model.state_dict())
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key


def test_qdrop_without_dropping_is_brecq():
    """QDrop differs from BRECQ by the dropping alone: at drop_prob 0 the saved tensors are the same."""
    states = []
    for method, extra in (("brecq", {}), ("qdrop", {"drop_prob": 0.0})):
        model = tiny_bert()
        config = QLimitConfig(weight_bits=2, act_bits=4, method=method, seed=3, **FAST, **extra)
        model.quantize_qlimit(calib_samples(), config)
        states.append(model.state_dict())
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key


@pytest.mark.parametrize("beta", [None, 20.0, 2.0])
def test_fused_soft_rounding_matches_autograd(beta, monkeypatch):
    """The hand-written backward of AdaRound's weight + regulariser equals autograd through the plain formula.

    Through the Linear op with x = I, so its output is the soft weight itself (transposed)."""
    from hf_qlimit.quantizers import chunks
    from hf_qlimit.quantizers.adaround import GAMMA, ZETA, SoftRoundedLinear

    monkeypatch.setattr(chunks, "TEMP_CHUNK", 32)  # two rows per chunk

    g = torch.Generator().manual_seed(0)
    alpha = (3 * torch.randn(8, 1, 16, generator=g)).requires_grad_(True)  # some h clamped at 0 or 1
    w_floor = torch.randint(-12, 18, (8, 1, 16), generator=g).float()  # some codes clamped at 0 or 15, far out too
    zero, scale = torch.randint(0, 8, (8, 1, 1), generator=g).float(), torch.rand(8, 1, 1, generator=g) + 0.1
    upstream = torch.randn(8, 1, 16, generator=g)

    # the stored code: floor + zero, clamped to [qmin - 2, qmax + 1] in int16, must not change value or gradient
    code_floor = (w_floor + zero).clamp(-2, 16).to(torch.int16)
    eye = torch.eye(16)
    out, reg = SoftRoundedLinear.apply(eye, alpha, code_floor, zero, scale, None, 0, 15, beta, True)
    out = out.t().reshape(8, 1, 16)
    ((out * upstream).sum() + 0.01 * reg).backward()
    fused = alpha.grad.clone()
    alpha.grad = None  # without the regulariser's value (report=False) its gradient is the same
    out2, reg2 = SoftRoundedLinear.apply(eye, alpha, code_floor, zero, scale, None, 0, 15, beta, False)
    ((out2.t().reshape(8, 1, 16) * upstream).sum() + 0.01 * reg2).backward()
    assert reg2.item() == 0.0 and torch.equal(alpha.grad, fused)

    alpha.grad = None
    h = torch.clamp(torch.sigmoid(alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)
    ref_out = (torch.clamp(w_floor + h + zero, 0, 15) - zero) * scale
    ref_reg = (1 - (2 * h - 1).abs().pow(beta)).sum() if beta is not None else 0.0
    ((ref_out * upstream).sum() + 0.01 * ref_reg).backward()
    torch.testing.assert_close(out, ref_out.detach())
    if beta is not None:
        torch.testing.assert_close(reg, ref_reg.detach())
    torch.testing.assert_close(fused, alpha.grad)


def _learning_linear(bits: int = 4, group_size: int | None = None) -> QuantLinear:
    torch.manual_seed(0)
    module = QuantLinear.from_linear(torch.nn.Linear(32, 24), {"w": bits, "a": None}, group_size, False, False)
    module.weight_quantizer.init_range(module.weight, 2.4)
    module.weight_quantizer.begin_adaround(module.weight)
    return module


@pytest.mark.parametrize(
    "group_size,beta,learn_scale",
    [(None, None, False), (8, 20.0, False), (None, 2.0, False), (8, 20.0, True), (None, None, True)],
)
def test_fused_soft_rounded_linear_matches_the_unfused_path(group_size, beta, learn_scale, monkeypatch):
    """The Linear's own backward (weight and its gradient a row chunk at a time) gives autograd's gradients,
    also for a learned step."""
    from hf_qlimit.quantizers import chunks

    monkeypatch.setattr(chunks, "TEMP_CHUNK", 100)  # several row chunks
    module = _learning_linear(group_size=group_size)
    quantizer, state = module.weight_quantizer, module.weight_quantizer.rounding
    state.set_schedule(beta)
    if learn_scale:
        state.learn_scale().data.uniform_(-0.2, 0.2)
    x = torch.randn(3, 5, 32, requires_grad=True)
    upstream = torch.randn(3, 5, 24)
    out = module(x)  # the fused op
    assert quantizer.learning
    reg = state.rounding_loss() if beta is not None else 0.0
    ((out * upstream).sum() + 0.01 * reg).backward()
    fused = out.detach(), state.alpha.grad.clone(), x.grad.clone()
    fused_scale = state.log_scale.grad.clone() if learn_scale else None

    state.alpha.grad, x.grad = None, None
    if learn_scale:
        state.log_scale.grad = None
    w_q = quantizer(module.weight)  # the soft weight as its own op, then a plain Linear
    reg = state.rounding_loss() if beta is not None else 0.0
    ref = torch.nn.functional.linear(x, w_q, module.bias)
    ((ref * upstream).sum() + 0.01 * reg).backward()
    torch.testing.assert_close(fused[0], ref.detach())
    torch.testing.assert_close(fused[1], state.alpha.grad)
    torch.testing.assert_close(fused[2], x.grad)
    if learn_scale:
        assert fused_scale.abs().sum() > 0
        torch.testing.assert_close(fused_scale, state.log_scale.grad)


@pytest.mark.parametrize("bits,dtype", [(2, torch.int8), (4, torch.int8), (6, torch.int8), (8, torch.int16)])
def test_rounding_codes_are_small_integers_and_the_fp_weight_can_go(bits, dtype):
    module = _learning_linear(bits)
    assert module.weight_quantizer.rounding.w_floor.dtype == dtype
    before = module.weight_quantizer(module.weight).detach()
    module.release_fp_weight()
    assert module.weight.is_meta
    assert torch.equal(module.weight_quantizer(module.weight).detach(), before)
    with torch.no_grad():
        expected = module.weight_quantizer.dequantize(
            torch.cat([codes for _, codes in module.weight_quantizer.code_chunks(module.weight)])
        )
    module.freeze()
    assert not module.weight.is_meta
    assert torch.equal(module.quantized_weight(), expected)


def test_adam_stepped_during_backward_equals_adam_after_backward():
    from hf_qlimit.calibration.rounding import step_in_backward

    torch.manual_seed(0)
    a, b = torch.randn(4, 5, requires_grad=True), torch.randn(3, requires_grad=True)
    a2, b2 = a.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([a2, b2], lr=1e-3, fused=True)
    hooks = step_in_backward([a, b], 1e-3)
    for _ in range(3):
        (a.sin().sum() * b.cos().sum() + a.sum()).backward()  # two uses of a: summed, then one step
        opt.zero_grad()
        (a2.sin().sum() * b2.cos().sum() + a2.sum()).backward()
        opt.step()
        assert a.grad is None and b.grad is None  # freed as soon as used
    assert torch.equal(a, a2) and torch.equal(b, b2)
    for hook in hooks:
        hook.remove()


def test_fused_lsq_matches_torchs_learnable_kernel_and_drops_exactly():
    from hf_qlimit.quantizers.lsq import LearnedStepQuant

    torch.manual_seed(0)
    x0, upstream = 3 * torch.randn(64, 48), torch.randn(64, 48)  # wide enough that some elements clip
    scale, zero = torch.tensor(0.02), torch.tensor(100.0)
    x, s = x0.clone().requires_grad_(True), scale.clone().requires_grad_(True)
    (LearnedStepQuant.apply(x, s, zero, 255, 0.0) * upstream).sum().backward()
    x_ref, s_ref = x0.clone().requires_grad_(True), scale.reshape(1).clone().requires_grad_(True)
    out_ref = torch._fake_quantize_learnable_per_tensor_affine(x_ref, s_ref, zero.reshape(1), 0, 255, 1.0)
    (out_ref * upstream).sum().backward()
    assert torch.equal(x.grad, x_ref.grad)
    torch.testing.assert_close(s.grad.reshape(1), s_ref.grad, rtol=1e-4, atol=1e-3)

    x.grad = s.grad = None
    out = LearnedStepQuant.apply(x, s, zero, 255, 0.5)
    dropped = out == x0  # dropped elements are x exactly (a quantized one equals x only by chance)
    assert 0.4 < dropped.float().mean() < 0.6
    (out * upstream).sum().backward()
    assert torch.equal(x.grad[dropped], upstream[dropped])  # straight through where kept in FP
    with torch.no_grad():
        quantized = torch.fake_quantize_per_tensor_affine(x0, 0.02, 100, 0, 255)
    assert torch.equal(out[~dropped], quantized[~dropped])


@pytest.mark.parametrize("mode", ["adaround", "adaround-learned-step", "sign"])
def test_finishing_keeps_the_hard_rounded_weight(mode):
    """`finish_learning` leaves the decided codes and the grid (a learned step or range baked in) that give the
    very floats the hard rounding gave while learning, and `freeze` packs exactly those."""
    torch.manual_seed(0)
    module = QuantLinear.from_linear(torch.nn.Linear(32, 24), {"w": 3, "a": None}, 8, False, False)
    quantizer = module.weight_quantizer
    quantizer.init_range(module.weight, 2.4)
    grid = quantizer.scale.clone()
    with torch.no_grad():
        if mode == "sign":
            state = quantizer.begin_sign(module.weight, learn_range=True)
            state.offset.uniform_(-0.5, 0.5)
            state.low_factor.uniform_(0.6, 1.0)
            state.high_factor.uniform_(0.6, 1.0)
        else:
            state = quantizer.begin_adaround(module.weight)
            state.set_hard(True)
            if mode == "adaround-learned-step":
                state.learn_scale().uniform_(-0.2, 0.2)
        hard = quantizer(module.weight)
        quantizer.finish_learning()
        assert not quantizer.learning
        assert torch.equal(quantizer(module.weight), hard)
    assert (mode == "adaround") == torch.equal(quantizer.scale, grid)  # a learned grid went into `scale`
    module.freeze()
    assert quantizer.rounding is None
    assert torch.equal(module.quantized_weight(), hard)
