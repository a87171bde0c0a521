"""The sequential calibration pipeline: one transformer block at a time, never re-running the model prefix.

Two streams flow through the blocks: the FP stream (FP inputs -> FP outputs, the reconstruction targets) and
the quantized stream (outputs of the already-quantized blocks). Block i is calibrated on the quantized
outputs of blocks < i. The pipeline feeds `reconstruct_block`; it knows nothing of the loss.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.utils import logging

from .block_inputs import capture_block_inputs, run_block, to_device
from .calibration import length_sorted_batches, prepare_calibration
from .config import QLimitConfig
from .integration import act_quantizers, convert_model, quant_state, quantized_modules
from .models import get_adapter
from .reconstruction import BlockData, block_output_error, fisher_weights, reconstruct_block

logger = logging.get_logger(__name__)


def _execution_device(model: nn.Module) -> torch.device:
    param = next(model.parameters())
    return param.device if param.device.type != "meta" else torch.device("cpu")


def _observe(quantizers: list, run, p: float) -> None:
    """Runs `run()` with the quantizers recording, then sets their ranges by Lp search."""
    for q in quantizers:
        q.observe()
    run()
    for q in quantizers:
        q.finish_observing(p)


def quantize_model(model: nn.Module, calib_ds: Any, config: QLimitConfig) -> nn.Module:
    """Quantizes `model` in place with Q-Limit PTQ and returns it, ready for `save_pretrained`."""
    if getattr(model, "is_quantized", False):
        raise ValueError("This model is already quantized; load the full-precision model to quantize it again.")
    if not isinstance(config, QLimitConfig):
        raise TypeError(f"`config` must be a QLimitConfig, got {type(config).__name__}.")
    adapter = get_adapter(model)
    config = copy.deepcopy(config)
    config.validate()
    device = _execution_device(model)
    pad_id = getattr(model.config, "pad_token_id", None)
    data = prepare_calibration(calib_ds, config.num_samples, config.max_length, pad_id, config.seed)
    batches = length_sorted_batches(data, config.batch_size)
    token_mask = [b["attention_mask"].bool() for b in batches]
    torch.manual_seed(config.seed)
    started = time.perf_counter()

    if config.bit_candidates is not None:  # mixed precision: choose each block Linear's bits on the FP model
        from .mixed_precision import allocate_bits

        config.module_bits = {**config.module_bits, **allocate_bits(model, adapter, batches, config, device)}
    config.layer_config = adapter.layer_config(model, config)
    if not config.layer_config:
        raise ValueError("The configuration leaves nothing to quantize (check modules_to_not_convert and first_last_bits).")
    model.eval()
    model.requires_grad_(False)
    try:
        return _quantize_converted(model, adapter, config, batches, token_mask, device, started)
    except BaseException:
        # The modules were swapped in place: a half-quantized model must not be saved by mistake.
        _attach_quantizer(model, config, failed=True)
        logger.error("Quantization failed; the model was modified in place and is unusable. Reload it to retry.")
        raise


def _quantize_converted(model, adapter, config, batches, token_mask, device, started) -> nn.Module:
    convert_model(model, config.layer_config, config, frozen=False)
    for _, module in quantized_modules(model):
        module.weight_quantizer.init_range(module.weight, config.lp_norm)

    blocks = adapter.blocks(model)
    in_blocks = {id(q) for q in act_quantizers(blocks)}
    outer_acts = [q for q in act_quantizers(model) if id(q) not in in_blocks]
    with quant_state(model, weights=False, acts=False):
        fp_in, inputs = capture_block_inputs(model, blocks[0], batches, device)
    with quant_state(model, weights=True, acts=True):
        captured = {}

        def capture_quantized() -> None:
            captured["q_in"] = capture_block_inputs(model, blocks[0], batches, device)[0]

        pending = _calibrate_outside_blocks(model, outer_acts, capture_quantized, config.lp_norm, last=False)
        if len(pending) < len(outer_acts):  # the prefix has quantized activations: capture again with them set
            capture_quantized()
        q_in = captured["q_in"]
    fisher = fisher_weights(model, blocks, batches, device) if config.loss == "fisher" and config.method != "rtn" else None

    stats: list[dict[str, float]] = []
    for i, block in enumerate(tqdm(blocks, desc="Quantizing blocks", unit="block")):
        with quant_state(block, weights=False, acts=False):
            fp_out = run_block(block, fp_in, inputs, device)
        if config.method == "rtn":  # the weights are final: freeze now so the passes below reuse them
            _freeze(block)
        with quant_state(block, weights=True, acts=True):
            _observe(list(act_quantizers(block)), lambda: run_block(block, q_in, inputs, device), config.lp_norm)
        data_i = BlockData(fp_in, q_in, fp_out, inputs, token_mask, None if fisher is None else fisher[i])
        if config.method != "rtn":
            rtn_error = block_output_error(block, data_i, device)
            reconstruct_block(block, data_i, config, device, desc=f"block {i}")
            _freeze(block)
        q_out = run_block(block, q_in, inputs, device)
        error = block_output_error(block, data_i, device, q_out=q_out)
        if config.method == "rtn":
            rtn_error = error
        logger.info(f"block {i}: output MSE {rtn_error:.4g} with round-to-nearest, {error:.4g} after {config.method}")
        stats.append({"block": i, "rtn_mse": rtn_error, "mse": error})
        fp_in, q_in = fp_out, q_out

    model.config.quantization_config = config

    def run_model() -> None:
        for batch in batches:
            model(**to_device(batch, device), use_cache=False)

    with quant_state(model, weights=True, acts=True):
        _calibrate_outside_blocks(model, pending, run_model, config.lp_norm, last=True)
    _freeze(model)
    _attach_quantizer(model, config)
    model.qlimit_block_errors = stats  # per block: output MSE against FP, round-to-nearest vs final
    logger.info(f"Quantized {len(config.layer_config)} modules in {time.perf_counter() - started:.1f}s")
    return model


@torch.no_grad()
def _calibrate_outside_blocks(model: nn.Module, quantizers: list, run: Callable[[], Any], p: float, last: bool) -> list:
    """Calibrates the activation quantizers outside the blocks that `run()` reaches; returns those it did not.

    Called once on the model prefix (e.g. OPT's project_in) and once, `last`, on the whole quantized model for
    the task or LM head. A quantizer never reached even then guards a module the forward pass does not use
    (e.g. an unused pooler): it is removed rather than left uncalibrated.
    """
    for q in quantizers:
        q.observe()
    run()
    pending = []
    for q in quantizers:
        if q.has_observed:
            q.finish_observing(p)
        else:
            q.stop_observing()
            pending.append(q)
    if last and pending:
        unused = {id(q) for q in pending}
        for name, module in quantized_modules(model):
            if getattr(module, "input_quantizer", None) is not None and id(module.input_quantizer) in unused:
                module.input_quantizer = None
                model.config.quantization_config.layer_config[name]["a"] = None
    return pending


def _freeze(module: nn.Module) -> None:
    for _, child in quantized_modules(module):
        if not child.is_frozen:
            child.freeze()


def _attach_quantizer(model: nn.Module, config: QLimitConfig, failed: bool = False) -> None:
    from .hf_quantizer import QLimitHfQuantizer

    model.config.quantization_config = config
    model.hf_quantizer = QLimitHfQuantizer(config, pre_quantized=True)
    model.hf_quantizer.failed = failed
    model.is_quantized = True
    model.quantization_method = config.quant_method
    model.requires_grad_(False)
