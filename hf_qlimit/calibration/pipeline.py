"""The sequential calibration pipeline: one transformer block at a time, never re-running the model prefix.

Two streams flow through the blocks: the FP stream (FP inputs -> FP outputs, the reconstruction targets) and
the quantized stream (outputs of the already-quantized blocks). Block i is calibrated on the quantized
outputs of blocks < i. The pipeline feeds `reconstruct_block`; it knows nothing of the loss.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.utils import logging

from .block_inputs import capture_block_inputs, run_block, to_device
from .cache import ActivationCache
from .data import length_sorted_batches, prepare_calibration
from ..config import QLimitConfig
from .fisher import fisher_weights
from ..hf.surgery import act_quantizers, convert_model, quant_state, quantized_modules, share_tied_codes
from ..models import get_adapter
from .observe import AllSeen, calibrate_outside_blocks, observe, stop_once_seen
from .offload import Offloader, bound_heap, default_device, is_dispatched, release_memory
from .reconstruction import BlockData, block_output_error, reconstruct_block
from .resume import WorkDir, fingerprint
from ..transforms import apply_transforms
from .weight_init import init_block_weights

logger = logging.get_logger(__name__)


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
    if getattr(model, "is_quantized", False):
        raise ValueError("This model is already quantized; load the full-precision model to quantize it again.")
    if not isinstance(config, QLimitConfig):
        raise TypeError(f"`config` must be a QLimitConfig, got {type(config).__name__}.")
    if resume and work_dir is None:
        raise ValueError("resume=True needs the work_dir of the interrupted run.")
    adapter = get_adapter(model)
    config = config.resolved(causal_lm=adapter.causal_lm)
    if config.method in ("brecq", "qdrop"):  # the filled fields say which method the defaults amount to
        logger.info(config.summary())
    dispatched = is_dispatched(model)
    if work_dir is not None and config.loss == "fisher" and config.method != "rtn":
        raise ValueError("work_dir (resumable runs) does not support loss='fisher' yet: use loss='mse'.")
    if dispatched and (config.loss == "fisher" or config.bit_candidates is not None):
        raise ValueError(
            "loss='fisher' and mixed precision need forward and backward passes through the whole model, which an "
            "offloaded model (device_map with 'disk' or 'cpu' offload) cannot hold: use loss='mse' and fixed bits."
        )
    if dispatched:  # offloaded to bound memory: the allocator must not hold on to what is freed either
        bound_heap()
    device = torch.device(device) if device is not None else default_device(model)
    pad_id = getattr(model.config, "pad_token_id", None)
    data = prepare_calibration(calib_ds, config.num_samples, config.max_length, pad_id, config.seed)
    batches = length_sorted_batches(data, config.batch_size)
    apply_transforms(model, adapter, config, batches, device)  # function-preserving, on the FP model (issue 19)
    run = _Run(
        device=device,
        offloader=Offloader(model, device),
        cache=ActivationCache(cache_budget_bytes, work_dir),
        work=WorkDir(work_dir, fingerprint(config.to_dict(), batches, model)) if work_dir is not None else None,
        home=None if dispatched else next(model.parameters()).device,
        token_mask=[b["attention_mask"].bool() for b in batches],
    )
    if run.work is not None:
        run.done = run.work.done_blocks()
        if run.done and not resume:
            raise ValueError(
                f"{work_dir} holds {run.done} finished blocks of this same quantization: pass resume=True to carry "
                "on from there, or use an empty work_dir to start over."
            )
    torch.manual_seed(config.seed)
    started = time.perf_counter()

    saved = run.work.layer_config() if run.done else None
    if saved is not None:  # the bits chosen by the interrupted run (mixed precision is not redone)
        config.module_bits, config.layer_config = saved["module_bits"], saved["layer_config"]
    else:
        if config.bit_candidates is not None:  # mixed precision: choose each block Linear's bits on the FP model
            from ..mixed_precision import allocate_bits

            config.module_bits = {**config.module_bits, **allocate_bits(model, adapter, batches, config, device)}
        config.layer_config = adapter.layer_config(model, config)
    if not config.layer_config:
        raise ValueError("The configuration leaves nothing to quantize (check modules_to_not_convert and first_last_bits).")
    model.eval()
    model.requires_grad_(False)
    try:
        return _quantize_converted(model, adapter, config, batches, run, started)
    except BaseException:
        # The modules were swapped in place: a half-quantized model must not be saved by mistake.
        _attach_quantizer(model, config, failed=True)
        logger.error("Quantization failed; the model was modified in place and is unusable. Reload it to retry.")
        raise


@dataclass
class _Run:
    """Where and how this quantization runs: execution device, offload, caches, resume state."""

    device: torch.device
    offloader: Offloader
    cache: ActivationCache
    work: WorkDir | None
    home: torch.device | None  # where an undispatched model lives, and goes back to; None: offloaded (-> CPU)
    token_mask: list[torch.Tensor]
    done: int = 0  # blocks finished by an interrupted run
    parked_dir: Path | None = None  # finished offloaded blocks' files when there is no work folder

    @property
    def parking(self) -> torch.device:
        """Where finished blocks wait: the model's own device, or CPU for an offloaded model."""
        return self.home or torch.device("cpu")

    def release_memory(self) -> None:
        """After freeing a large module: an offloaded run returns the memory to the OS (see offload.py)."""
        if self.home is None:
            release_memory()


def _convert(model: nn.Module, names: list[str], run: _Run, config: QLimitConfig, frozen: bool) -> list[nn.Module]:
    """Materializes the modules `names` on the execution device and swaps them for quantized ones."""
    for name in names:
        run.offloader.materialize(name)
    convert_model(model, {n: config.layer_config[n] for n in names}, config, frozen=frozen)
    modules = [model.get_submodule(n) for n in names]
    for module in modules:
        if hasattr(module, "weight_quantizer"):  # attention quantizers hold no weight
            module.keep_dequantized = False  # memory stays bounded by one block; restored at the end
            if not frozen:
                module.weight_quantizer.init_range(module.weight, config.weight_range_p)
    return modules


def _quantize_converted(model, adapter, config, batches, run: _Run, started) -> nn.Module:
    device, cache = run.device, run.cache
    blocks = adapter.blocks(model)
    blocks_name = adapter.blocks_name(model) + "."
    outer = [n for n in config.layer_config if not n.startswith(blocks_name)]
    prefix = _prefix_modules(model, blocks[0], batches[0], run.parking)
    for name in prefix:  # the model prefix runs whole on the execution device
        run.offloader.materialize(name, recurse=False)
    prefix_quantized = [n for n in outer if n in prefix]
    _convert(model, prefix_quantized, run, config, frozen=run.done > 0)

    in_blocks = {id(q) for q in act_quantizers(blocks)}
    if run.done:
        run.work.load_prefix({n: model.get_submodule(n) for n in prefix_quantized})
        inputs, state = run.work.load_state(run.done)
        fp_in, q_in = cache.stream(state["streams"]["fp_in"]), cache.stream(state["streams"]["q_in"])
        stats, pending = state["stats"], []
    else:
        outer_acts = [q for q in act_quantizers(model) if id(q) not in in_blocks]  # the prefix's: nothing else yet
        with quant_state(model, weights=False, acts=False):
            fp_in, inputs = capture_block_inputs(model, blocks[0], batches, device, cache)
        with quant_state(model, weights=True, acts=True):
            captured = {}

            def capture_quantized() -> None:
                captured["q_in"] = capture_block_inputs(model, blocks[0], batches, device, cache)[0]

            pending = calibrate_outside_blocks(model, outer_acts, capture_quantized, config.lp_norm, last=False)
            if len(pending) < len(outer_acts):  # the prefix has quantized activations: capture again with them set
                capture_quantized()
            q_in = captured["q_in"]
        stats = []
    fisher = None
    if config.loss == "fisher" and config.method != "rtn":
        _convert(model, [n for n in config.layer_config if n not in prefix_quantized], run, config, frozen=False)
        fisher = fisher_weights(model, blocks, batches, device, config.fisher_damping)
    _freeze_names(model, prefix_quantized)  # RTN weights, final; the FP prefix is no longer needed
    run.release_memory()
    if run.work is not None and not run.done:
        layer_config = {"module_bits": config.module_bits, "layer_config": config.layer_config}
        run.work.save_start(layer_config, {n: model.get_submodule(n) for n in prefix_quantized}, inputs)
    for name in prefix_quantized:  # an offloaded embedding waits on disk for the final pass, as blocks do
        if run.offloader.was_offloaded(name):
            _park(name, run, None)

    token_mask = run.token_mask
    for i, block in enumerate(tqdm(blocks, desc="Quantizing blocks", unit="block")):
        name = f"{blocks_name}{i}"
        names = [n for n in config.layer_config if n == name or n.startswith(name + ".")]  # the block: its output op
        if i < run.done:  # finished by the interrupted run: rebuild it from the work folder
            run.offloader.materialize(name)
            _convert(model, names, run, config, frozen=True)
            run.work.load_block(i, block)
            _park(name, run, run.work.block_file(i))
            continue
        tick = time.perf_counter()
        run.offloader.materialize(name)
        if fisher is None:
            _convert(model, names, run, config, frozen=False)
            run.release_memory()  # the replaced Linears (a cycle, see offload.py) must not keep the FP weights alive
        with quant_state(block, weights=False, acts=False):
            fp_out = run_block(block, fp_in, inputs, device, cache)
        if config.weight_init != "rtn":
            init_block_weights(block, q_in, inputs, token_mask, device, config.weight_init, config.init_margin,
                               config.gptq_act_order)
        if config.method == "rtn":  # the weights are final: freeze now so the passes below reuse them
            for _, module in quantized_modules(block):
                module.weight_quantizer.round_start()
            _freeze(block)
        with quant_state(block, weights=True, acts=True):
            observe(list(act_quantizers(block)), lambda: run_block(block, q_in, inputs, device), config.lp_norm)
        data_i = BlockData(fp_in, q_in, fp_out, inputs, token_mask, None if fisher is None else fisher[i])
        if config.method != "rtn":
            rtn_error = block_output_error(block, data_i, device)
            undecided = reconstruct_block(block, data_i, config, device, desc=f"block {i}").undecided
            _freeze(block)
        q_out = run_block(block, q_in, inputs, device, cache)
        error = block_output_error(block, data_i, device, q_out=q_out)
        if config.method == "rtn":
            rtn_error, undecided = error, 0.0
        logger.info(
            f"block {i}: output MSE {rtn_error:.4g} with round-to-nearest, {error:.4g} after {config.method} (hard "
            f"rounding; {undecided:.1%} of the rounding variables were still undecided before it)"
        )
        stats.append({"block": i, "rtn_mse": rtn_error, "mse": error, "undecided": undecided,
                      "seconds": time.perf_counter() - tick})  # fmt: skip
        fp_in, q_in = fp_out, q_out
        del data_i, fp_out, q_out
        if run.work is not None:
            run.work.save_block(i, block, {"fp_in": fp_in, "q_in": q_in}, stats)
        _park(name, run, run.work.block_file(i) if run.work is not None else None)

    head = [n for n in outer if n not in prefix_quantized]
    if fisher is None:
        _convert(model, head, run, config, frozen=False)
    pending += [q for n in head for q in act_quantizers(model.get_submodule(n))]
    _freeze_names(model, head)  # RTN weights, final: the FP head (vocab x hidden) need not outlive this line
    run.release_memory()
    for name in _rest_of_model(model, blocks_name):
        run.offloader.materialize(name, recurse=False)
    model.config.quantization_config = config

    def run_model() -> None:
        if not pending:
            return
        with _blocks_visiting(blocks, device, run), stop_once_seen(pending) as seen:
            for batch in batches:
                seen.clear()
                try:
                    model(**to_device(batch, device), use_cache=False)
                except AllSeen:
                    pass

    with quant_state(model, weights=True, acts=True):
        calibrate_outside_blocks(model, pending, run_model, config.lp_norm, last=True)
    _freeze(model)
    if run.home is None:  # offloaded: no fp32 copy of the embedding or head either, so inference stays bounded
        run.offloader.release()  # the model is back on CPU, parked blocks on disk
    else:
        for _, module in quantized_modules(model):
            del module.keep_dequantized  # back to the class default: packed inference, no float copy
        if share_tied_codes(model):
            logger.info("The embedding reads its codes from the tied LM head: one copy in memory.")
        if run.home != device:
            model.to(run.home)
    _attach_quantizer(model, config)
    model.qlimit_block_errors = stats  # per block: output MSE against FP, round-to-nearest vs final, seconds
    logger.info(f"Quantized {len(config.layer_config)} modules in {time.perf_counter() - started:.1f}s")
    return model


def _park(name: str, run: _Run, saved: Path | None) -> None:
    """A finished block leaves the execution device when the model lives elsewhere: back to disk if it came
    from there (into `saved`, its state in the work folder, when there is one), else to CPU or the model's home."""
    if run.offloader.was_offloaded(name):
        if saved is None:
            if run.parked_dir is None:
                run.parked_dir = Path(tempfile.mkdtemp(prefix="qlimit_parked_"))
                # the files must live as long as the model that reads them
                weakref.finalize(run.offloader.model, shutil.rmtree, run.parked_dir, ignore_errors=True)
            run.offloader.park(name, run.parked_dir / f"{name}.safetensors")
        else:
            run.offloader.park(name, saved, write=False)
    else:
        run.offloader.model.get_submodule(name).to(run.parking)
    run.release_memory()


@contextmanager
def _blocks_visiting(blocks: nn.ModuleList, device: torch.device, run: _Run) -> Iterator[None]:
    """Whole-model passes with parked blocks: each block visits the execution device for its own forward."""
    if run.parking == device:
        yield
        return

    blocks = [b for b in blocks if getattr(b, "_hf_hook", None) is None]  # parked on disk: their hooks do this

    def visit(block: nn.Module, args: Any) -> None:
        block.to(device)

    def leave(block: nn.Module, args: Any, out: Any) -> None:
        block.to(run.parking)  # no memory release here: this runs for every block of every batch

    handles = []
    for block in blocks:
        handles.append(block.register_forward_pre_hook(visit))
        handles.append(block.register_forward_hook(leave))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def _prefix_modules(
    model: nn.Module, first_block: nn.Module, batch: dict[str, torch.Tensor], input_device: torch.device
) -> list[str]:
    """Names of the modules the forward pass calls before the first block (embeddings, rotary, project_in)."""
    names = {id(m): n for n, m in model.named_modules()}
    inside = {id(m) for m in first_block.modules()}
    seen: dict[str, None] = {}

    def record(module, args):
        if id(module) not in inside:
            seen[names[id(module)]] = None

    handles = [m.register_forward_pre_hook(record) for m in model.modules() if id(m) not in inside]
    try:
        # the model as it is now: accelerate's hooks move a dispatched model's inputs themselves
        capture_block_inputs(model, first_block, [batch], input_device)
    finally:
        for handle in handles:
            handle.remove()
    return list(seen)


def _rest_of_model(model: nn.Module, blocks_name: str) -> list[str]:
    """Modules outside the blocks (final norm, head...): materialized for the last whole-model pass."""
    return [n for n, _ in model.named_modules() if not n.startswith(blocks_name) and n + "." != blocks_name]


def _freeze_names(model: nn.Module, names: list[str]) -> None:
    for name in names:
        _freeze(model.get_submodule(name))


def _freeze(module: nn.Module) -> None:
    for _, child in quantized_modules(module):
        if not child.is_frozen:
            child.freeze()


def _attach_quantizer(model: nn.Module, config: QLimitConfig, failed: bool = False) -> None:
    from ..hf.quantizer import QLimitHfQuantizer

    model.config.quantization_config = config
    model.hf_quantizer = QLimitHfQuantizer(config, pre_quantized=True)
    model.hf_quantizer.failed = failed
    model.is_quantized = True
    model.quantization_method = config.quant_method
    model.requires_grad_(False)
