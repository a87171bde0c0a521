"""The sequential calibration pipeline: one transformer block at a time, never re-running the model prefix.

Two streams flow through the blocks: the FP stream (FP inputs -> FP outputs, the reconstruction targets) and
the quantized stream (outputs of the already-quantized blocks). Block i is calibrated on the quantized
outputs of blocks < i. The pipeline feeds `reconstruct_block`; it knows nothing of the loss.

The steps, in order: the model prefix (embeddings...) is converted and both streams captured at the first
block; each block is converted, initialised, reconstructed and frozen; then the head is converted, one pass of
the whole model calibrates the activation quantizers still pending, and the quantizer is attached.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.utils import logging

from ..config import QLimitConfig
from ..forward import is_dispatched, to_device
from ..hf.quantizer import QLimitHfQuantizer
from ..hf.surgery import share_tied_codes
from ..models import get_adapter
from ..models.base import ArchitectureAdapter
from ..nn.attention_probe import attention_refusal
from ..nn.memory import bound_heap
from ..nn.modules import set_inference_mode
from ..quantizers import ActQuantizer
from ..transforms import apply_transforms
from .block_inputs import (
    capture_block_inputs,
    capture_stack_inputs,
    modules_outside_blocks,
    prefix_modules,
)
from .block_step import Flow, block_modules, freeze_names, freeze_quantized, quantize_block
from .data import length_sorted_batches, prepare_calibration
from .fisher import fisher_weights
from .observe import AllSeen, calibrate_outside_blocks, remove_input_quantizers, stop_once_seen
from .offload import default_device
from .quant_state import act_quantizers, quant_state
from .run import Run
from .stacks import Layout, add_decoder_inputs, capture_first_stack, discover_layout

logger = logging.get_logger(__name__)

Batches = list[dict[str, torch.Tensor]]


def quantize_model(
    model: nn.Module,
    calib_ds: Any,
    config: QLimitConfig,
    *,
    device: str | torch.device | None = None,
    work_dir: str | os.PathLike | None = None,
    resume: bool = False,
    cache_budget_bytes: int | None = None,
) -> nn.Module:
    """Quantizes `model` in place with Q-Limit PTQ and returns it, ready for `save_pretrained`."""
    _check_request(model, config, work_dir, resume)
    adapter = get_adapter(model)
    config = config.for_model(model)
    logger.info(config.summary())  # what the preset filled in, so a run says what it ran
    dispatched = is_dispatched(model)
    if dispatched:  # offloaded to bound memory: the allocator must not hold on to what is freed either
        bound_heap()
    device = torch.device(device) if device is not None else default_device(model)
    pad_id = getattr(model.config, "pad_token_id", None)
    data = prepare_calibration(calib_ds, config.num_samples, config.max_length, pad_id, config.seed, model=model)
    batches = add_decoder_inputs(model, length_sorted_batches(data, config.batch_size))
    where = torch.device("cpu") if dispatched else next(model.parameters()).device
    layout = discover_layout(model, batches[-1], where)  # the shortest batch: one cheap forward
    _check_supported(model, config, work_dir, dispatched, layout)
    apply_transforms(model, adapter, config, batches, device)  # function-preserving, on the FP model (issue 19)
    run = Run.open(model, config, batches, device, dispatched, work_dir, resume, cache_budget_bytes)
    torch.manual_seed(config.seed)
    started = time.perf_counter()
    _choose_bits(model, adapter, config, batches, run)
    model.eval()
    model.requires_grad_(False)
    try:
        _quantize_converted(model, layout, config, batches, run)
    except BaseException:
        # The modules were swapped in place: a half-quantized model must not be saved by mistake.
        _attach_quantizer(model, config, failed=True)
        logger.error("Quantization failed; the model was modified in place and is unusable. Reload it to retry.")
        raise
    logger.info(f"Quantized {len(config.layer_config)} modules in {time.perf_counter() - started:.1f}s")
    return model


def _check_request(model: nn.Module, config: QLimitConfig, work_dir: Any, resume: bool) -> None:
    if getattr(model, "is_quantized", False):
        raise ValueError("This model is already quantized; load the full-precision model to quantize it again.")
    if not isinstance(config, QLimitConfig):
        raise TypeError(f"`config` must be a QLimitConfig, got {type(config).__name__}.")
    if resume and work_dir is None:
        raise ValueError("resume=True needs the work_dir of the interrupted run.")


def _check_supported(model: nn.Module, config: QLimitConfig, work_dir: Any, dispatched: bool, layout: Layout) -> None:
    """The combinations of the resolved config with this model, resumable, offloaded or encoder-decoder runs that
    are not supported."""
    if config.quantize_attention and config.act_bits is not None:  # noqa: SIM102 (the refusal is built only then)
        if (refused := attention_refusal(model, layout.attention)) is not None:
            raise refused
    if len(layout.stacks) > 1:
        asked = {
            "work_dir (resumable runs)": work_dir is not None,
            "offload (device_map)": dispatched,
            "loss='fisher'": config.loss == "fisher" and config.method != "rtn",
            "mixed precision (bit_candidates)": config.bit_candidates is not None,
        }
        if refused := [what for what, on in asked.items() if on]:
            raise ValueError(
                f"{', '.join(refused)}: not supported yet for models with several block stacks (an encoder-decoder: "
                f"{', '.join(s.name for s in layout.stacks)}). Leave them out."
            )
    if work_dir is not None and config.loss == "fisher" and config.method != "rtn":
        raise ValueError("work_dir (resumable runs) does not support loss='fisher' yet: use loss='mse'.")
    if dispatched and (config.loss == "fisher" or config.bit_candidates is not None):
        raise ValueError(
            "loss='fisher' and mixed precision need forward and backward passes through the whole model, which an "
            "offloaded model (device_map with 'disk' or 'cpu' offload) cannot hold: use loss='mse' and fixed bits."
        )


def _choose_bits(
    model: nn.Module, adapter: ArchitectureAdapter, config: QLimitConfig, batches: Batches, run: Run
) -> None:
    """Fills `config.module_bits` and `config.layer_config`: the modules to quantize and their bits."""
    saved = run.work.layer_config() if run.done else None
    if saved is not None:  # the bits chosen by the interrupted run (mixed precision is not redone)
        config.module_bits, config.layer_config = saved["module_bits"], saved["layer_config"]
    else:
        if config.bit_candidates is not None:  # mixed precision: choose each block Linear's bits on the FP model
            from ..mixed_precision import allocate_bits  # scipy loads only for mixed precision

            config.module_bits = {**config.module_bits, **allocate_bits(model, adapter, batches, config, run.device)}
        config.layer_config = adapter.layer_config(model, config)
    if not config.layer_config:
        raise ValueError(
            "The configuration leaves nothing to quantize (check modules_to_not_convert and first_last_bits)."
        )


def _quantize_converted(model: nn.Module, layout: Layout, config: QLimitConfig, batches: Batches, run: Run) -> None:
    """The quantization proper, once the bits are chosen: the prefix, the blocks one at a time, then the rest."""
    first = layout.stacks[0].blocks
    prefix = _convert_prefix(model, config, first[0], batches[0], layout.prefixes, run, [])
    flow = _resume_flow(model, prefix, run) if run.done else _capture_flow(model, config, layout, batches, run)
    fisher = None
    if config.loss == "fisher" and config.method != "rtn":  # its passes need the whole model converted first
        run.convert(model, [n for n in config.layer_config if n not in prefix], config, frozen=False)
        fisher = fisher_weights(model, first, batches, run.device, config.fisher_damping)
    _settle_prefix(model, config, prefix, flow, run)
    index = 0
    for s, stack in enumerate(layout.stacks):
        if s > 0:
            prefix += _enter_later_stack(model, config, layout, s, batches, flow, prefix, run)
        for i, block in enumerate(tqdm(stack.blocks, desc=f"Quantizing {stack.name}", unit="block")):
            name = f"{stack.name}.{i}"
            if index < run.done:  # finished by the interrupted run: rebuild it from the work folder
                run.offloader.materialize(name)
                run.convert(model, block_modules(config, name), config, frozen=True)
                run.work.load_block(index, block)
                run.park(name, run.work.block_file(index))
            else:
                block_fisher = None if fisher is None else fisher[i]
                quantize_block(model, config, (index, i), name, block, flow, block_fisher, run)
            index += 1
    head = [n for n in config.layer_config if not n.startswith(layout.prefixes) and n not in prefix]
    _convert_head(model, config, head, fisher is None, flow, run)
    for name in modules_outside_blocks(model, layout.prefixes):
        run.offloader.materialize(name, recurse=False)
    _calibrate_pending(model, config, layout.all_blocks(), batches, flow.pending, run)
    freeze_quantized(model)
    _finish(model, config, flow.stats, run)


def _convert_prefix(
    model: nn.Module,
    config: QLimitConfig,
    first_block: nn.Module,
    batch: dict[str, torch.Tensor],
    prefixes: tuple[str, ...],
    run: Run,
    done: list[str],
) -> list[str]:
    """Converts the quantized modules outside the blocks that the forward pass calls before `first_block` and
    that are not in `done`; returns their names."""
    prefix = prefix_modules(model, first_block, batch, run.parking)
    for name in prefix:  # the model prefix runs whole on the execution device
        run.offloader.materialize(name, recurse=False)
    quantized = [n for n in config.layer_config if not n.startswith(prefixes) and n in prefix and n not in done]
    run.convert(model, quantized, config, frozen=run.done > 0)
    return quantized


def _enter_later_stack(
    model: nn.Module,
    config: QLimitConfig,
    layout: Layout,
    s: int,
    batches: Batches,
    flow: Flow,
    done: list[str],
    run: Run,
) -> list[str]:
    """Stack `s` > 0 (a decoder): the modules between it and the stack before (its embedding) are converted and
    frozen, then its stream and its blocks' arguments are captured from the model quantized so far."""
    blocks = layout.stacks[s].blocks
    between = _convert_prefix(model, config, blocks[0], batches[0], layout.prefixes, run, done)
    flow.defer([q for n in between for q in act_quantizers(model.get_submodule(n))])
    freeze_names(model, between)
    with quant_state(model, weights=True, acts=True):
        flow.enter_stack(*capture_stack_inputs(model, blocks, batches, run.device, run.cache))
    return between


def _resume_flow(model: nn.Module, prefix: list[str], run: Run) -> Flow:
    """The prefix and the streams entering the first unfinished block, as the interrupted run saved them."""
    run.work.load_prefix({n: model.get_submodule(n) for n in prefix})
    inputs, state = run.work.load_state(run.done)
    fp_in, q_in = run.cache.stream(state["streams"]["fp_in"]), run.cache.stream(state["streams"]["q_in"])
    return Flow(fp_in, q_in, inputs, state["stats"])


def _capture_flow(model: nn.Module, config: QLimitConfig, layout: Layout, batches: Batches, run: Run) -> Flow:
    """Both streams at the first block; the prefix's activation quantizers are calibrated on the way."""
    blocks = layout.stacks[0].blocks
    in_blocks = {id(q) for b in layout.all_blocks() for q in act_quantizers(b)}
    outer_acts = [q for q in act_quantizers(model) if id(q) not in in_blocks]  # the prefix's: nothing else yet
    with quant_state(model, weights=False, acts=False):
        fp_in, inputs = capture_first_stack(model, layout, batches, run.device, run.cache)
    with quant_state(model, weights=True, acts=True):
        captured = {}

        def capture_quantized() -> None:
            captured["q_in"] = capture_block_inputs(model, blocks[0], batches, run.device, run.cache)[0]

        pending = calibrate_outside_blocks(outer_acts, capture_quantized, config.lp_norm)
        if len(pending) < len(outer_acts):  # the prefix has quantized activations: capture again with them set
            capture_quantized()
    return Flow(fp_in, captured["q_in"], inputs, pending=pending)


def _settle_prefix(model: nn.Module, config: QLimitConfig, prefix: list[str], flow: Flow, run: Run) -> None:
    """Freezes the prefix, writes the start of a resumable run, and parks an offloaded embedding."""
    freeze_names(model, prefix)  # RTN weights, final; the FP prefix is no longer needed
    run.release_memory()
    if run.work is not None and not run.done:
        layer_config = {"module_bits": config.module_bits, "layer_config": config.layer_config}
        run.work.save_start(layer_config, {n: model.get_submodule(n) for n in prefix}, flow.inputs)
    for name in prefix:  # an offloaded embedding waits on disk for the final pass, as blocks do
        if run.offloader.was_offloaded(name):
            run.park(name, None)


def _convert_head(model: nn.Module, config: QLimitConfig, head: list[str], convert: bool, flow: Flow, run: Run) -> None:
    """The quantized modules after the blocks (the task or LM head): RTN weights, frozen at once; their
    activation quantizers wait for the final pass. `convert`: False when Fisher weights converted them already."""
    if convert:
        run.convert(model, head, config, frozen=False)
    flow.defer([q for n in head for q in act_quantizers(model.get_submodule(n))])
    freeze_names(model, head)  # RTN weights, final: the FP head (vocab x hidden) need not outlive this line
    run.release_memory()


def _calibrate_pending(
    model: nn.Module,
    config: QLimitConfig,
    blocks: nn.ModuleList,
    batches: Batches,
    pending: list[ActQuantizer],
    run: Run,
) -> None:
    """The activation quantizers outside the blocks not calibrated yet, on passes of the whole quantized model
    that stop once all of them have seen the batch."""

    def run_model() -> None:
        if not pending:
            return
        with run.blocks_visiting(blocks), stop_once_seen(pending) as seen:
            for batch in batches:
                seen.clear()
                try:
                    model(**to_device(batch, run.device), use_cache=False)
                except AllSeen:
                    pass

    with quant_state(model, weights=True, acts=True):
        unused = calibrate_outside_blocks(pending, run_model, config.lp_norm)
        for name in remove_input_quantizers(model, unused):
            config.layer_config[name]["a"] = None  # the saved config must not ask for a quantizer that is gone


def _finish(model: nn.Module, config: QLimitConfig, stats: list[dict], run: Run) -> None:
    """The frozen model back where it lives, in its inference mode, with its quantizer attached."""
    if run.home is None:  # offloaded: no fp32 copy of the embedding or head either, so inference stays bounded
        run.offloader.release()  # the model is back on CPU, parked blocks on disk
    else:
        set_inference_mode(model, "packed")  # quantization dequantized per call; the default keeps no float copy
        if share_tied_codes(model):
            logger.info("The embedding reads its codes from the tied LM head: one copy in memory.")
        if run.home != run.device:
            model.to(run.home)
    _attach_quantizer(model, config)
    model.qlimit_block_errors = stats  # per block: output MSE against FP, round-to-nearest vs final, seconds


def _attach_quantizer(model: nn.Module, config: QLimitConfig, failed: bool = False) -> None:
    """Marks `model` as quantized with `config`, as `from_pretrained` would; `failed`: it must not be saved."""
    model.config.quantization_config = config
    model.hf_quantizer = QLimitHfQuantizer(config, pre_quantized=True)
    if failed:
        model.hf_quantizer.mark_failed()
    model.is_quantized = True
    model.quantization_method = config.quant_method
    model.requires_grad_(False)
