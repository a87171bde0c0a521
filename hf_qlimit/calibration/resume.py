"""The work folder of a resumable quantization: what is done, written after every block.

Layout: `prefix.safetensors` (the quantized modules before the first block), `block_<i>.safetensors`,
`inputs.pt` (the blocks' other arguments), `state_<i>.pt` (the two streams entering block i + 1, RNG states,
per-block stats) and `progress.json`, written last and atomically: a run killed at any moment (even kill -9)
leaves either the previous progress or the new one, never a half-written one.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

PROGRESS = "progress.json"


def fingerprint(config_dict: dict, batches: list[dict[str, torch.Tensor]], model: nn.Module) -> str:
    """Identifies a run: the settings, the calibration tokens and the model's class and shape."""
    digest = hashlib.sha256()
    settings = {k: v for k, v in config_dict.items() if k != "layer_config"}
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    digest.update(f"{type(model).__name__}:{model.config.to_json_string(use_diff=False)}".encode())
    for batch in batches:
        digest.update(batch["input_ids"].numpy().tobytes())
    return digest.hexdigest()[:16]


def _rng_state() -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def cpu_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's state_dict as contiguous CPU tensors, ready for safetensors."""
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


class WorkDir:
    """Reads and writes the progress of one run in `folder`."""

    def __init__(self, folder: str | os.PathLike, run_id: str) -> None:
        self.folder, self.run_id = Path(folder), run_id
        self.folder.mkdir(parents=True, exist_ok=True)

    def done_blocks(self) -> int:
        """How many blocks a previous run finished (0 if none); refuses a folder of another run."""
        path = self.folder / PROGRESS
        if not path.is_file():
            return 0
        progress = json.loads(path.read_text())
        if progress["run"] != self.run_id:
            raise ValueError(
                f"{self.folder} holds the progress of another quantization (other settings, calibration data or "
                "model). Use another work_dir, or delete this one to start over."
            )
        return progress["done_blocks"]

    def layer_config(self) -> dict | None:
        path = self.folder / "layer_config.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def save_start(self, layer_config: dict, prefix: dict[str, nn.Module], inputs: Any) -> None:
        (self.folder / "layer_config.json").write_text(json.dumps(layer_config))
        torch.save(inputs, self.folder / "inputs.pt")
        save_file(
            {f"{n}.{k}": v for n, m in prefix.items() for k, v in cpu_state_dict(m).items()},
            self.folder / "prefix.safetensors",
        )

    def block_file(self, i: int) -> Path:
        return self.folder / f"block_{i}.safetensors"

    def save_block(self, i: int, block: nn.Module, streams: dict[str, Any], stats: list[dict]) -> None:
        save_file(cpu_state_dict(block), self.block_file(i))
        state = {"streams": {k: list(v) for k, v in streams.items()}, "rng": _rng_state(), "stats": stats}
        torch.save(state, self.folder / f"state_{i}.pt")
        tmp = self.folder / (PROGRESS + ".tmp")
        tmp.write_text(json.dumps({"run": self.run_id, "done_blocks": i + 1}))
        os.replace(tmp, self.folder / PROGRESS)  # the commit point
        (self.folder / f"state_{i - 1}.pt").unlink(missing_ok=True)

    def load_prefix(self, prefix: dict[str, nn.Module]) -> None:
        state = load_file(self.folder / "prefix.safetensors")
        for name, module in prefix.items():
            own = {k[len(name) + 1 :]: v for k, v in state.items() if k.startswith(name + ".")}
            module.load_state_dict(own, strict=True)

    def load_block(self, i: int, block: nn.Module) -> None:
        block.load_state_dict(load_file(self.block_file(i)), strict=True)

    def load_state(self, done_blocks: int) -> tuple[Any, dict[str, Any]]:
        """The blocks' other arguments and the state after `done_blocks` blocks; restores the RNG states."""
        # Our own files (block arguments may hold any object): not loadable with weights_only.
        inputs = torch.load(self.folder / "inputs.pt", weights_only=False)
        state = torch.load(self.folder / f"state_{done_blocks - 1}.pt", weights_only=False)
        _set_rng_state(state["rng"])
        return inputs, state
