"""One block's step of the calibration pipeline: converted, its FP targets computed, its roundings started and
reconstructed on the quantized stream, frozen, parked; and `Flow`, what passes from one block to the next."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from torch import nn
from transformers.utils import logging

from ..config import QLimitConfig
from ..hf.surgery import quantized_modules
from ..quantizers import ActQuantizer
from .block_inputs import BlockInputs, StackInputs, run_block
from .cache import Stream
from .observe import observe
from .quant_state import act_quantizers, quant_state
from .reconstruction import BlockData, block_output_error, reconstruct_block
from .run import Run
from .weight_init import WeightStart, init_block_weights

logger = logging.get_logger(__name__)


@dataclass
class Flow:
    """What passes from one block to the next."""

    fp_in: Stream  # the block's FP inputs: the FP targets' inputs
    q_in: Stream  # its inputs from the quantized blocks before it
    inputs: StackInputs  # each block's other arguments (masks, positions), the same for both streams
    stats: list[dict] = field(default_factory=list)  # per finished block: output errors and seconds
    pending: list[ActQuantizer] = field(default_factory=list)  # outside the blocks, left to the final pass

    def advance(self, stats: dict, fp_out: Stream, q_out: Stream) -> None:
        """A block is done: its stats are kept and its outputs become the next block's inputs."""
        self.stats.append(stats)
        self.fp_in, self.q_in = fp_out, q_out

    def defer(self, quantizers: list[ActQuantizer]) -> None:
        """Activation quantizers to calibrate in the final whole-model pass."""
        self.pending += quantizers

    def enter_stack(self, hidden: Stream, inputs: StackInputs) -> None:
        """A later stack (a decoder) starts from one captured stream: FP targets and quantized inputs alike."""
        self.fp_in, self.q_in, self.inputs = hidden, hidden, inputs


def block_modules(config: QLimitConfig, name: str) -> list[str]:
    """The modules to quantize in the block `name`, the block itself included (its output op)."""
    return [n for n in config.layer_config if n == name or n.startswith(name + ".")]


def quantize_block(
    model: nn.Module,
    config: QLimitConfig,
    at: tuple[int, int],
    name: str,
    block: nn.Module,
    flow: Flow,
    fisher: Stream | None,
    run: Run,
) -> None:
    """Block `name`, at (index over all stacks, index in its stack): converted, its FP outputs computed,
    calibrated on the quantized stream, frozen, then parked."""
    (i, local), tick = at, time.perf_counter()
    inputs = flow.inputs.for_block(local)
    run.offloader.materialize(name)
    if fisher is None:  # with Fisher weights, every module was converted before their passes
        run.convert(model, block_modules(config, name), config, frozen=False)
        run.release_memory()  # the replaced Linears (a cycle, see offload.py) must not keep the FP weights alive
    with quant_state(block, weights=False, acts=False):
        fp_out = run_block(block, flow.fp_in, inputs, run.device, run.cache)
    starts = _start_block(block, config, flow.q_in, inputs, run)
    data = BlockData(flow.fp_in, flow.q_in, fp_out, inputs, run.token_mask, fisher)
    if config.method != "rtn":
        rtn_error = block_output_error(block, data, run.device)
        undecided = reconstruct_block(block, data, config, run.device, f"block {i}", starts).undecided
        freeze_quantized(block)
    q_out = run_block(block, flow.q_in, inputs, run.device, run.cache)
    error = block_output_error(block, data, run.device, q_out=q_out)
    if config.method == "rtn":
        rtn_error, undecided = error, 0.0
    logger.info(
        f"block {i}: output MSE {rtn_error:.4g} with round-to-nearest, {error:.4g} after {config.method} (hard "
        f"rounding; {undecided:.1%} of the rounding variables were still undecided before it)"
    )
    stats = {
        "block": i,
        "rtn_mse": rtn_error,
        "mse": error,
        "undecided": undecided,
        "seconds": time.perf_counter() - tick,
    }
    flow.advance(stats, fp_out, q_out)
    del data, fp_out, q_out
    if run.work is not None:
        run.work.save_block(i, block, {"fp_in": flow.fp_in, "q_in": flow.q_in}, flow.stats)
    run.park(name, run.work.block_file(i) if run.work is not None else None)


def _start_block(
    block: nn.Module, config: QLimitConfig, q_in: Stream, inputs: BlockInputs, run: Run
) -> dict[str, WeightStart]:
    """Where the roundings start (RTN's are final at once), then the activation ranges on the quantized stream;
    returns the starts left for reconstruction (see `init_block_weights`)."""
    starts = {}
    if config.weight_init != "rtn":
        starts = init_block_weights(
            block,
            q_in,
            inputs,
            run.token_mask,
            run.device,
            config.weight_init,
            config.init_margin,
            config.gptq_act_order,
        )
    if config.method == "rtn":  # the weights are final: freeze now so the passes below reuse them
        for name, module in quantized_modules(block):
            if (start := starts.pop(name, None)) is not None:  # else plain round-to-nearest, at freezing
                module.weight_quantizer.round_start(start.weight, start.margin)
        freeze_quantized(block)

    def quantized_pass() -> None:
        run_block(block, q_in, inputs, run.device)

    with quant_state(block, weights=True, acts=True):
        observe(list(act_quantizers(block)), quantized_pass, config.lp_norm)
    return starts


def freeze_quantized(module: nn.Module) -> None:
    """Freezes every quantized layer of `module` not frozen yet: its weight becomes packed integer codes."""
    for _, child in quantized_modules(module):
        if not child.is_frozen:
            child.freeze()


def freeze_names(model: nn.Module, names: list[str]) -> None:
    for name in names:
        freeze_quantized(model.get_submodule(name))
