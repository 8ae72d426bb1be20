"""The edge step-size controller as ``torch.optim`` optimizers, for a user's own training loop.

``EdgeSGD`` (GD, EMA or heavy-ball momentum, Nesterov's), ``EdgeAdam``, ``EdgeNAdam`` and ``EdgeAdamW`` run
flowsim's update rules (:mod:`flowsim.solvers.rules`)
under its :class:`~flowsim.solvers.Edge` policy — the same objects the simulator runs, no second implementation.
``step(closure)`` takes a closure as ``torch.optim.LBFGS`` does: it evaluates the model on the current minibatch
and returns the loss (it may call ``backward`` itself, and then may return the loss as a number; the optimizer
clears and reads ``.grad``). The controller
calls it once for the step's gradient and once per Hessian-vector product it needs (forward differences of
gradients, every ``every`` steps): all at the parameters of this step, on the batch the closure sees, and all with
the random state the step began with, so that a closure that draws random numbers (dropout) draws the same ones
each time: a difference of two gradients under two dropout masks is the masks' difference over ε, not curvature.
After the step the random state is the one the first call left, as if the closure had been called once, as
``torch.optim.Adam`` calls it. (Buffers a forward pass updates, such as BatchNorm's running statistics, are the
model's, out of the optimizer's reach: the extra calls update them too.)

There is no ``lr``: the controller sets η at every step (``max_lr`` caps it, ``c`` scales it; ``lr`` is refused in
one line that says so). Curvature is measured on the closure's batch, by differences of its gradients (the key
``hvp`` is not accepted: exact products would need the loss as a function of a flat parameter vector). The
parameters that require grad form one flat vector in ``parameters_to_vector`` order (one parameter group, one dtype
and device); frozen ones are left as they are and out of the curvature (with them in, a product's frozen rows
are 0 and the operator is not symmetric). The dtype is float32 or float64: in bfloat16 a difference of gradients is
rounding (S read 0 and η was ∞).
The optimizer's state (step, rule state, controller state) is exact under ``state_dict``/``load_state_dict``: a
resumed loop continues bit for bit on CPU; a state saved by another rule or over other parameter sizes is refused
in one line. This module holds no model and no data.
"""
from __future__ import annotations

import inspect
import math
from typing import Callable, Iterable, Optional

import numpy as np
import torch
from pydantic import ValidationError
from torch import Tensor

from flowsim.solvers import Edge, StepContext, make_rule
from flowsim.solvers.rules import Rule

NOT_IN_AN_OPTIMIZER = {"hvp": "products are differences of the closure's gradients",
                       "weight_decay": "only EdgeAdamW has it, decoupled as in torch.optim.AdamW"}
NOT_A_STEP_SIZE = ("lr: the edge controller sets the step size itself; pass max_lr=... to cap it, or c=... to "
                   "scale it (the fraction of the stability threshold)")
"""Why ``lr`` is refused rather than read as the cap: a user who writes ``EdgeAdam(params, lr=1e-3)`` means a step
size, and a cap of 1e-3 would run plain Adam at 1e-3 wherever the controller's η is larger, silently."""
SET_OUTSIDE = ("lr: param_groups[0]['lr'] was changed outside the optimizer (by an lr scheduler?), and the edge "
               "controller would ignore it; cap the step with max_lr=... or scale it with c=...")
"""A scheduler writes ``lr`` after each step; the controller sets η itself at the next, so the schedule would have
no effect while ``param_groups`` showed it."""


class _Closure:
    """The part of flowsim's Problem interface that the step context needs — (loss, flat gradient) at a flat w —
    over the optimizer's parameters and the user's closure. ``at`` is the flat point the parameters hold (the
    step's w until a Hessian-vector product moves them to w + εv), so the step's own evaluation copies nothing.
    Every call starts from the random state ``start`` (the step's); ``after`` is the state the first call left."""

    def __init__(self, params: list[Tensor], closure: Callable[[], Tensor], w: Tensor):
        self.params, self.closure, self.at = params, closure, w
        self.sizes = [p.numel() for p in params]
        self.device = w.device
        self.start, self.after = _random_state(self.device), None

    def load(self, w: Tensor) -> None:
        if w is self.at:
            return
        with torch.no_grad():
            for p, chunk in zip(self.params, torch.split(w, self.sizes)):
                p.copy_(chunk.view_as(p))
        self.at = w

    def loss_and_grad(self, w: Tensor, idx: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        self.load(w)
        for p in self.params:
            p.grad = None
        if self.after is not None:
            _set_random_state(self.start, self.device)
        with torch.enable_grad():
            loss = self.closure()
            if not isinstance(loss, Tensor):  # a number, as torch.optim.LBFGS takes, after its own backward
                if loss is None or all(p.grad is None for p in self.params):
                    raise ValueError(f"closure: returned {loss!r} and no gradient; it must return the loss tensor, "
                                     "or call loss.backward() and return the loss (a tensor or a number)")
                loss = torch.tensor(float(loss), dtype=w.dtype, device=w.device)
            elif loss.numel() != 1:  # torch said "grad can be implicitly created only for scalar outputs"
                raise ValueError(f"closure: returned a loss of shape {tuple(loss.shape)}; it must return the batch's "
                                 "loss as one number (its mean over the examples, e.g. criterion(...).mean())")
            elif all(p.grad is None for p in self.params) and loss.requires_grad:  # the closure did not backward
                loss.backward()
        if self.after is None:
            self.after = _random_state(self.device)
        try:
            g = torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1) for p in self.params])
        except RuntimeError:
            if any(p.grad is not None and p.grad.is_sparse for p in self.params):
                raise ValueError("params: a sparse gradient (nn.Embedding(sparse=True)?); the update rules take "
                                 "dense gradients: make the module with sparse=False") from None
            raise
        return loss.detach(), g


def _random_state(device: torch.device) -> tuple:
    """torch's random state for the CPU and, where the parameters are on a GPU, for that device."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_random_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _betas(betas) -> dict:
    """β1 and β2 from ``betas``, refused in one line unless it is a pair."""
    if isinstance(betas, (Tensor, np.ndarray)):  # a pair held in an array
        betas = betas.tolist()
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas: a pair (beta1, beta2), got {betas!r}")
    return {"beta1": betas[0], "beta2": betas[1]}


class EdgeOptimizer(torch.optim.Optimizer):
    """An update rule of :mod:`flowsim.solvers.rules` under the edge controller (:class:`flowsim.solvers.Edge`):
    η_k = c·θ/S with S the tracked λ_max(P̃⁻¹H). ``edge`` holds the controller's options (``c``, ``max_lr``,
    ``every``, …; docs/step-size.md). After each step ``param_groups[0]["lr"]`` is the η it took."""

    def __init__(self, params: Iterable, rule: Rule, **edge):
        if "lr" in edge:
            raise ValueError(NOT_A_STEP_SIZE)
        for key in NOT_IN_AN_OPTIMIZER.keys() & edge.keys():
            raise ValueError(f"{key}: does not apply to {type(self).__name__} ({NOT_IN_AN_OPTIMIZER[key]})")
        for key in sorted(edge.keys() - Edge.model_fields.keys()):  # torch's amsgrad, foreach, maximize, ...
            own = [k for k in inspect.signature(type(self).__init__).parameters if k not in ("self", "params", "edge")]
            controller = [k for k in Edge.model_fields if k not in NOT_IN_AN_OPTIMIZER]
            raise ValueError(f"{key}: not an option of {type(self).__name__} (it takes {', '.join(own + controller)})")
        try:
            policy = Edge(**edge)
        except ValidationError as e:
            first = e.errors()[0]
            raise ValueError(f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
        super().__init__(params, {"lr": float("nan")})
        params = [self.param_groups[0]["params"][i] for i in self._trainable()]
        if len({(p.dtype, p.device) for p in params}) != 1:
            raise ValueError("params: all parameters must share one dtype and device")
        if params[0].dtype not in (torch.float32, torch.float64):
            raise ValueError(f"params: {str(params[0].dtype).removeprefix('torch.')}: the controller measures "
                             "curvature by differences of gradients, which need float32 or float64 parameters (keep "
                             "them in float32 and run the forward pass in low precision under torch.autocast)")
        policy.check(rule)
        self.rule, self.policy = rule, policy

    def add_param_group(self, param_group: dict) -> None:
        """The first group only: the controller sets one η for one flat parameter vector, and the rule's state
        is laid out over it (a group added later would be left untrained)."""
        if self.param_groups:
            raise ValueError("params: one parameter group (the controller sets one η for one flat parameter "
                             "vector, and the rule's state is laid out over it); pass all the parameters as one "
                             "list, e.g. model.parameters(), to a new optimizer")
        super().add_param_group(param_group)

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's, after checking that the state was saved by an optimizer of the same rule over trainable
        parameters of the same sizes (the rule's state is laid out over them): either mismatch is a one-line error,
        raised before anything is loaded (it was a size mismatch at the next step, or Adam's state run by SGD)."""
        saved = state_dict.get("state", {}).get(0) or {}
        if saved.get("of", self.rule.name) != self.rule.name:
            raise ValueError(f"state_dict: saved by an optimizer of rule {saved['of']!r}; this one runs "
                             f"{self.rule.name!r}")
        sizes = [self.param_groups[0]["params"][i].numel() for i in self._trainable()]
        if saved.get("sizes", sizes) != sizes:
            raise ValueError(f"state_dict: saved over trainable parameters of sizes {saved['sizes']}; these have "
                             f"{sizes}")
        super().load_state_dict(state_dict)

    def _trainable(self) -> list[int]:
        """The positions in the group of the parameters that require grad (one line if none does)."""
        trainable = [i for i, p in enumerate(self.param_groups[0]["params"]) if p.requires_grad]
        if not trainable:
            raise ValueError("params: none requires grad, so there is nothing to train")
        return trainable

    def _flat_state(self) -> dict:
        """The optimizer's whole state, kept under its first parameter so that ``state_dict`` carries it."""
        first = self.param_groups[0]["params"][0]
        if first not in self.state or not self.state[first]:
            self.state[first] = {"step": 0, "rule": None, "policy": self.policy.init(), "of": self.rule.name}
        return self.state[first]

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Tensor]] = None) -> Tensor:  # type: ignore[override]
        """One step of the rule at the controller's η; returns the closure's loss at the parameters before it."""
        if closure is None:
            raise ValueError("closure: required, opt.step(closure) with a closure that evaluates the loss on the "
                             "current batch and returns it (as for torch.optim.LBFGS)")
        state = self._flat_state()
        shown, taken = self.param_groups[0]["lr"], state["policy"]["eta"]  # NaN before the first step
        if shown != taken and not (math.isnan(shown) and math.isnan(taken)):
            raise ValueError(SET_OUTSIDE)
        trainable = self._trainable()
        params = [self.param_groups[0]["params"][i] for i in trainable]
        if state.setdefault("trainable", trainable) != trainable:
            raise ValueError("params: which parameters require grad changed after the first step (the rule's state "
                             "is laid out over them); make a new optimizer after freezing or unfreezing")
        if "sizes" not in state:  # once: what load_state_dict checks a saved state against
            state["sizes"] = [p.numel() for p in params]
        w = torch.cat([p.detach().reshape(-1) for p in params])
        problem = _Closure(params, closure, w)
        ctx = StepContext(problem, self.rule, state["step"], w, state["rule"])
        lr, state["policy"] = self.policy.update(state["step"], ctx, state["policy"])
        loss, g = ctx.loss_and_grad()
        if state["rule"] is None:
            state["rule"] = self.rule.init(w, g)
        delta, state["rule"] = self.rule.update(g, state["rule"], lr, w)
        if problem.at is w:  # the parameters hold w and .grad the step's gradient: step in place
            torch._foreach_add_(params, [d.view_as(p) for p, d in zip(params, torch.split(delta, problem.sizes))])
        else:  # a Hessian-vector product left the parameters and their .grad at a probe point
            problem.load(w + delta)
            for p, chunk in zip(params, torch.split(g, problem.sizes)):
                p.grad = chunk.view_as(p)  # the gradient of this step (g is not reused)
        _set_random_state(problem.after, problem.device)  # as if the closure had been called once
        state["step"] += 1
        self.param_groups[0]["lr"] = lr
        return loss


class EdgeSGD(EdgeOptimizer):
    """GD under the edge controller; with ``momentum`` β > 0 EMA momentum m ← βm + (1 − β)g (threshold
    (2 + 2β)/(1 − β)), or with ``heavy_ball`` m ← βm + g (threshold 2 + 2β); with ``nesterov`` either one's
    Nesterov form (``heavy_ball`` and ``nesterov``: ``torch.optim.SGD(nesterov=True)``'s step).
    ``edge``: the controller's options."""

    def __init__(self, params: Iterable, momentum: float = 0.0, heavy_ball: bool = False, nesterov: bool = False,
                 **edge):
        if momentum or heavy_ball or nesterov:
            rule = make_rule("nesterov" if nesterov else "momentum", beta1=momentum, heavy_ball=heavy_ball)
        else:
            rule = make_rule("gd")
        super().__init__(params, rule, **edge)


class EdgeAdam(EdgeOptimizer):
    """Adam (bias-corrected; ``betas`` = (β1, β2), ``eps`` added to √v̂) under the edge controller, which holds
    λ_max(P̃⁻¹H) at c·(2 + 2β1)/((1 − β1)η). ``edge``: the controller's options."""

    def __init__(self, params: Iterable, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, **edge):
        super().__init__(params, make_rule("adam", **_betas(betas), eps=eps), **edge)


class EdgeNAdam(EdgeOptimizer):
    """NAdam (Adam with Nesterov's look-ahead, ``torch.optim.NAdam`` without its momentum schedule; ``betas``,
    ``eps`` as Adam's) under the edge controller, which holds λ_max(P̃⁻¹H) at c·2(1 + β1)/((1 + 2β1)(1 − β1)η).
    ``edge``: the controller's options."""

    def __init__(self, params: Iterable, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, **edge):
        super().__init__(params, make_rule("nadam", **_betas(betas), eps=eps), **edge)


class EdgeAdamW(EdgeOptimizer):
    """AdamW (Adam's step plus −η·``weight_decay``·w outside the preconditioner, ``torch.optim.AdamW``'s update;
    ``betas``, ``eps`` as Adam's) under the edge controller, which holds λ_max(P̃⁻¹H) at Adam's c·(2 + 2β1)/((1 −
    β1)η). ``edge``: the controller's options."""

    def __init__(self, params: Iterable, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, **edge):
        super().__init__(params, make_rule("adamw", **_betas(betas), eps=eps,
                                           weight_decay=weight_decay), **edge)
