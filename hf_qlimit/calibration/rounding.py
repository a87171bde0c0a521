"""The rounding modes of reconstruction (`QLimitConfig.rounding`), one class each, driven by the loop in
reconstruction.py through the same hooks, in this order:

    start(modules, starts, release_fp)  attaches a rounding state to each weight quantizer, from its FP weight
                                or its entry of `starts` (GPTQ's w̃, see weight_init.py); returns the parameters
                                the loop's Adam should learn with them (the learned weight steps)
    per step:  before_step(step, report) -> True once the rounding learns no more;  loss(reconstruction error);
               backward (AdaRound's V are stepped during it, see `step_in_backward`);  after_step()
    finish()                    the rounding becomes hard: the quantizers keep the decided codes

- "anneal": AdaRound as in the papers: soft V, the regulariser's β annealed from 20 to 2 after a warm-up
  without it, hard rounding at the end.
- "progressive": AdaRound hardened in rounds, the variables farthest from ½ first; once all are hard only the
  steps still learn.
- "sign": AutoRound's signed steps on V and the grid's range, every forward pass hard-rounded, the best iterate
  kept.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers.utils import logging

from ..config import QLimitConfig
from ..nn.modules import QuantLinear
from ..quantizers.adaround import AdaRoundState, beta_schedule, hardened_fraction
from ..quantizers.signround import SignRoundState, SignSGD
from .weight_init import WeightStart

logger = logging.get_logger(__name__)


def _adam(param: torch.Tensor, lr: float) -> torch.optim.Adam:
    """torch's Adam for one tensor: fused where torch has the kernel (CPU, CUDA), one pass with no weight-sized
    temporaries, where the single-tensor path makes two and takes several times as long."""
    return torch.optim.Adam([param], lr=lr, fused=param.device.type in ("cpu", "cuda") and param.is_floating_point())


def step_in_backward(params: list[nn.Parameter], lr: float) -> list:
    """Adam on each of `params` as soon as its gradient is complete (autograd sums every use of a leaf before
    accumulating, so once per backward pass), which is then freed: a block's gradients never exist all at
    once. Adam is elementwise, so this equals one Adam stepped after backward. Returns the hook handles."""
    optimizers = {id(p): _adam(p, lr) for p in params}

    def step(p: nn.Parameter) -> None:
        optimizers[id(p)].step()
        p.grad = None

    return [p.register_post_accumulate_grad_hook(step) for p in params]


class Rounding:
    """The hooks of one rounding mode; this base class learns nothing and never evaluates soft."""

    def __init__(self, config: QLimitConfig) -> None:
        self.config = config
        self.modules: list[QuantLinear] = []

    def start(
        self, modules: dict[str, QuantLinear], starts: dict[str, WeightStart], release_fp: bool
    ) -> list[nn.Parameter]:
        """Attaches the rounding to each module's weight quantizer, starting at the module's entry of `starts` or
        else at its FP weight; the entries used are taken out of `starts`, so no w̃ outlives the state built from
        it. `release_fp`: the FP weights go once the states hold the rounding (the targets are cached)."""
        self.modules = list(modules.values())
        return []

    def before_step(self, step: int, report: bool) -> bool:
        """Sets up step `step` (`report`: the progress bar shows this one); True when the rounding has nothing
        left to learn."""
        return False

    def loss(self, rec: torch.Tensor) -> torch.Tensor:
        """The loss to minimise, from the reconstruction error `rec` of this step's forward pass."""
        return rec

    def after_step(self) -> None:
        """After backward and the loop's Adam step."""

    def undecided(self) -> float:
        """The share of rounding variables still undecided (h strictly between 0.01 and 0.99)."""
        return 0.0

    @contextmanager
    def hard(self) -> Iterator[None]:
        """Evaluates with the rounding as it would be hardened now."""
        yield

    def finish(self) -> None:
        for module in self.modules:
            module.weight_quantizer.finish_learning()  # hard rounding, learned steps into `scale`


def learns_scale(config: QLimitConfig, module: QuantLinear) -> bool:
    """`learn_weight_scale`, except on a grid a file format fixes (a GGUF k-quant's: its scales are integer
    multiples of a per-super-block fp16 step, which a learned factor would leave), which keeps its scales."""
    if not config.learn_weight_scale:
        return False
    if module.weight_quantizer.fixed_grid:
        logger.info_once(
            "learn_weight_scale is off for the k-quant grids of weight_format: their snapped scales stay, only the "
            "rounding is learned."
        )
        return False
    return True


def take_start(name: str, module: QuantLinear, starts: dict[str, WeightStart]) -> WeightStart:
    """Where the rounding of `module` starts: its entry of `starts`, removed from there, else its FP weight."""
    start = starts.pop(name, None)
    return start if start is not None else WeightStart(module.weight)


class AnnealRounding(Rounding):
    """AdaRound: V learned by Adam (stepped during backward), with the regulariser λ Σ (1 − |2h − 1|^β) once
    warm-up ends, β annealed from `beta_range[0]` to `beta_range[1]`; optionally the weight steps too."""

    def start(
        self, modules: dict[str, QuantLinear], starts: dict[str, WeightStart], release_fp: bool
    ) -> list[nn.Parameter]:
        super().start(modules, starts, release_fp)
        self.states: list[AdaRoundState] = []
        for name, module in modules.items():
            start = take_start(name, module, starts)
            self.states.append(module.weight_quantizer.begin_adaround(start.weight, start.margin))
            if release_fp:
                module.release_fp_weight()
        self.all_hard = False
        self.beta: float | None = None
        self.hooks = step_in_backward([state.alpha for state in self.states], self.config.weight_lr)
        return [s.learn_scale() for m, s in zip(self.modules, self.states) if learns_scale(self.config, m)]

    def before_step(self, step: int, report: bool) -> bool:
        config = self.config
        self.beta = beta_schedule(step, config.iters, config.warmup, *config.beta_range)
        for state in self.states:  # the forward pass computes the regulariser alongside the weight
            state.set_schedule(self.beta, report)  # its value only shows in the progress bar
        return self.all_hard

    def loss(self, rec: torch.Tensor) -> torch.Tensor:
        if self.beta is None or not self.states or self.all_hard:
            return rec
        return rec + self.config.round_loss_weight * sum(state.rounding_loss() for state in self.states)

    def undecided(self) -> float:
        counts = [state.undecided() for state in self.states]
        return sum(c for c, _ in counts) / max(1, sum(n for _, n in counts))

    @contextmanager
    def hard(self) -> Iterator[None]:
        for state in self.states:
            state.set_hard(True)
        try:
            yield
        finally:
            for state in self.states:
                state.set_hard(False)

    def finish(self) -> None:
        for hook in self.hooks:
            hook.remove()
        super().finish()


class ProgressiveRounding(AnnealRounding):
    """AdaRound hardened in about 20 rounds from the end of warm-up to 80% of the iterations (see
    `hardened_fraction`); the remaining steps train the weight and activation steps on the hard block."""

    def __init__(self, config: QLimitConfig) -> None:
        super().__init__(config)
        self.rounds = max(1, config.iters // 20)

    def before_step(self, step: int, report: bool) -> bool:
        if not self.all_hard:
            fraction = hardened_fraction(step, self.config.iters, self.config.warmup)
            if fraction > 0 and (step % self.rounds == 0 or fraction == 1.0):
                for state in self.states:
                    state.harden_fraction(fraction)
            if fraction == 1.0:  # V has no gradient left: only the steps train from here, at less cost
                self.all_hard = True
                for state in self.states:
                    state.stop_learning()
        return super().before_step(step, report)


class SignRounding(Rounding):
    """AutoRound's update: offsets V and (with `learn_weight_scale`) the grid's range, stepped by lr · sign(∂L)
    with the lr decaying to 0; every forward pass is hard-rounded, and the iterate of lowest loss is kept."""

    def start(
        self, modules: dict[str, QuantLinear], starts: dict[str, WeightStart], release_fp: bool
    ) -> list[nn.Parameter]:
        super().start(modules, starts, release_fp)
        self.states: list[SignRoundState] = []
        self.params: list[nn.Parameter] = []
        for name, module in modules.items():
            start = take_start(name, module, starts)  # its margin is AdaRound's: the signed steps start at w̃ itself
            self.states.append(module.weight_quantizer.begin_sign(start.weight, learns_scale(self.config, module)))
            self.params += self.states[-1].parameters_to_learn()
            if release_fp:
                module.release_fp_weight()
        self.optimizer = SignSGD(self.params, self.config.weight_lr, self.config.iters) if self.params else None
        self.best_loss, self.best = float("inf"), None
        return []

    def loss(self, rec: torch.Tensor) -> torch.Tensor:
        if self.optimizer is not None and (value := rec.item()) < self.best_loss:  # the codes' loss before this step
            self.best_loss, self.best = value, [p.detach().clone() for p in self.params]
        return rec

    def after_step(self) -> None:
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            for state in self.states:
                state.clamp_()

    def finish(self) -> None:
        if self.best is not None:
            with torch.no_grad():
                for p, b in zip(self.params, self.best):
                    p.copy_(b)
        super().finish()


def rounding_for(config: QLimitConfig) -> Rounding:
    """The strategy of `config.rounding`; "anneal", the papers', also for a config not yet resolved (None).

    `config.method` plays no part: `method="adaround"` (Linear by Linear) runs whatever rounding the preset chose,
    so under the decoder preset "fast-lm" (rounding="sign") it takes AutoRound's signed steps, not AdaRound's
    annealed V; `rounding="anneal"` asks for the latter."""
    strategies = {"progressive": ProgressiveRounding, "sign": SignRounding}
    return strategies.get(config.rounding, AnnealRounding)(config)
