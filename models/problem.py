"""A training problem seen as functions of one flat parameter vector w.

Conventions: w is the concatenation of ``module.named_parameters()`` that require grad, in order, each flattened
row-major (``torch.nn.utils.parameters_to_vector`` order; a tied tensor once, frozen ones not at all). The loss
is averaged over examples; for ``mse`` it is ½‖f(x) − y‖² per example (y one-hot for class labels), for ``ce``
the cross-entropy in nats.
This module knows nothing about optimizers, processes or storage.
"""
from __future__ import annotations

import copy
import math

from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor
from torch.func import functional_call, grad, jvp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` → cuda when available, else cpu; ``cpu``, ``cuda``, ``cuda:N`` as asked (others, such as mps
    without float64, in one line). The one place that chooses a device."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return dev


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """float32 or float64, named or as a torch dtype: curvature by differences of gradients and the eigensolvers'
    tolerances need at least float32's precision (in float16 a difference product is rounding)."""
    if dtype in DTYPES.values():
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def mse_loss(out: Tensor, y: Tensor) -> Tensor:
    """½‖f(x) − y‖² summed over outputs, averaged over examples."""
    return 0.5 * (out - y).pow(2).reshape(out.shape[0], -1).sum(1).mean()


def ce_loss(out: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy (nats) averaged over examples; y holds integer class indices."""
    return torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


LOSSES = {"mse": mse_loss, "ce": ce_loss}


class Problem:
    """Loss L(w) of a model on data, with its derivatives, for a flat parameter vector w.

    ``loss_fn(w, X, Y)`` returns the loss averaged over the rows of X (landscapes ignore X and Y, which are None).
    ``output_fn(w, X)`` returns the model outputs (networks only). Every method takes and returns tensors of
    the problem's dtype on its device.
    """

    def __init__(self, loss_fn: Callable, w0: Tensor, X: Optional[Tensor] = None, Y: Optional[Tensor] = None,
                 output_fn: Optional[Callable] = None, meta: Optional[dict] = None,
                 fast_loss: Optional[Callable] = None):
        self._loss_fn = loss_fn
        self.w0 = w0.detach()
        self.X, self.Y = X, Y
        self._output_fn = output_fn
        self._fast_loss = fast_loss
        self.meta = dict(meta or {})

    # ---- construction ------------------------------------------------------------------------------
    @classmethod
    def from_module(cls, module: torch.nn.Module, X: Tensor, Y: Optional[Tensor] = None,
                    loss: str | Callable[[Tensor, Tensor], Tensor] = "mse", dtype: str | torch.dtype = "float64",
                    device: str = "auto", meta: Optional[dict] = None):
        """Wrap an ``nn.Module`` and its training data: ``X`` (n, …) inputs, ``Y`` targets of the model's output
        shape (n, C) for ``mse``, or n integer labels for ``ce``. ``loss`` may also be a criterion of the user's,
        ``loss(output, Y_batch)`` → the mean loss over the batch's examples (``torch.nn.BCEWithLogitsLoss()`` for a
        one-logit binary classifier, ``torch.nn.HuberLoss()``): Y is then passed as it is (floats cast to
        ``dtype``), and a criterion that returns no scalar, or sums over the examples, is refused in one line.
        The Problem works on its own copy of the module in ``dtype`` on ``device``: the caller's module is never
        changed. Shapes that do not fit raise a one-line ValueError naming ``X`` or ``Y`` (a 1-D ``Y`` for a
        one-output model would otherwise broadcast). ``X`` may instead be a ``torch.utils.data`` Dataset or
        DataLoader of (input, target) pairs, with ``Y`` absent: every example is loaded, in the dataset's order (a
        DataLoader's batches, shuffling and sampler are not used: runs draw their own batches).

        The module runs in the mode it is in. Its loss must be a function of the weights: a module whose output
        differs between two calls at the same weights (dropout in training mode) is refused in one line, since
        every flow, eigensolver and product would read its random draws as curvature (``module.eval()`` turns
        dropout off). BatchNorm in training mode is accepted: it normalizes each batch by that batch's statistics,
        so the loss on a batch is a function of the weights and of the whole batch, not a mean over its examples;
        per-example losses and gradients (an SDE's minibatch noise, the noise kernel) are then refused in one line.
        The copy does not track running statistics, which training mode does not read: its loss is the same, and
        a pure function that torch.func can transform (the rod flow, the functional flows).

        The weights w are the parameters that require grad, in ``named_parameters`` order; frozen ones
        (``requires_grad_(False)``, a frozen backbone) stay as they are. ``X`` and ``Y`` may be tensors or
        arrays (numpy, lists). Inputs are cast to ``dtype``, but for integer inputs that the module takes as
        they are (token ids for an ``nn.Embedding``).

        Attention (``torch.nn.functional.scaled_dot_product_attention``, ``nn.MultiheadAttention``,
        ``nn.TransformerEncoderLayer``) runs on torch's math kernel in the Problem's losses: the fused CPU kernel has
        no second derivative, and every Hessian-vector product failed on it. The step's gradient (``loss_and_grad``)
        keeps torch's choice of kernel.

        Per-example losses and gradients are vmapped over the examples where vmap can batch the module, and taken
        one example at a time where it cannot (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``): an LSTM of 8 units on 64
        sequences of 10 steps takes 158 ms for all per-example gradients against 1.7 ms for the batch's gradient.
        """
        if not isinstance(module, torch.nn.Module):
            what = f"the class {module.__name__}" if isinstance(module, type) else type(module).__name__
            raise ValueError(f"module: must be a torch.nn.Module instance, got {what}")
        if not callable(loss) and loss not in LOSSES:
            raise ValueError(f"loss must be one of {sorted(LOSSES)} or a criterion loss(output, Y), got {loss!r}")
        dev, dt = resolve_device(device), resolve_dtype(dtype)
        if Y is None:
            X, Y = _examples(X)
        X, Y = _as_tensor("X", X), _as_tensor("Y", Y)
        module = copy.deepcopy(module).to(device=dev, dtype=dt)
        batch_statistics = False
        for m in module.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training:
                m.track_running_stats, m.running_mean, m.running_var, m.num_batches_tracked = False, None, None, None
                batch_statistics = True
        X = X.to(device=dev)
        if X.is_floating_point() or not _takes_as_is(module, X):
            X = X.to(dtype=dt)
        if callable(loss):  # the criterion sees Y as the runs will
            Y = Y.to(device=dev, dtype=dt if Y.is_floating_point() else None)
        _check_module_and_data(module, X, Y, loss)
        trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("module: no parameter requires grad, so there are no weights to train")
        names = [n for n, _ in trainable]
        shapes = [p.shape for _, p in trainable]
        sizes = [p.numel() for _, p in trainable]
        buffers = dict(module.named_buffers())
        w0 = torch.cat([p.detach().reshape(-1) for _, p in trainable]).clone()
        Y = Y.to(device=dev, dtype=torch.long if loss == "ce" else dt if loss == "mse" else None)
        criterion = loss if callable(loss) else LOSSES[loss]

        def output_fn(w: Tensor, x: Tensor) -> Tensor:
            params = {n: t.view(s) for n, t, s in zip(names, torch.split(w, sizes), shapes)}
            with sdpa_kernel(SDPBackend.MATH):  # the fused attention kernels have no second derivative
                return functional_call(module, (params, buffers), (x,))

        def loss_fn(w: Tensor, x: Tensor, y: Tensor) -> Tensor:
            return criterion(output_fn(w, x), y)

        name = loss if isinstance(loss, str) else getattr(loss, "__name__", type(loss).__name__)
        info = {"loss": name, "n_params": w0.numel(), **(meta or {})}
        if batch_statistics:
            info["batch_statistics"] = True
        return cls(loss_fn, w0, X, Y, output_fn=output_fn, meta=info,
                   fast_loss=_flat_parameter_loss(module, names, sizes, shapes, w0, criterion))

    @classmethod
    def from_function(cls, fn: Callable[[Tensor], Tensor], w0, dtype: str | torch.dtype = "float64",
                      device: str = "auto", meta: Optional[dict] = None):
        """A closed-form landscape L(w) = fn(w) starting at w0 (no data: minibatches are not defined). ``fn`` maps
        the flat w to a scalar tensor in torch operations (autograd differentiates it); what does not is refused
        in one line."""
        dev, dt = resolve_device(device), resolve_dtype(dtype)
        w0 = torch.as_tensor(w0, dtype=dt, device=dev).reshape(-1)
        if w0.numel() == 0 or not bool(torch.isfinite(w0).all()):
            raise ValueError(f"w0: needs at least one value, all finite, got {w0.tolist()}")
        with torch.enable_grad():
            try:
                value = fn(w0.clone().requires_grad_(True))
            except (RuntimeError, TypeError) as e:  # numpy on w, an op torch refuses
                raise ValueError(f"fn: fails on w (a tensor that requires grad): {str(e).splitlines()[0]}") from None
            if not isinstance(value, Tensor) or value.numel() != 1:
                got = f"shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"fn: must return the loss as a scalar tensor computed from w in torch operations, "
                                 f"got {got}")
            if not value.requires_grad:
                raise ValueError("fn: its value does not depend on w through torch operations (no gradient)")
        return cls(lambda w, x, y: fn(w), w0, meta={"n_params": w0.numel(), **(meta or {})})

    # ---- basic facts -------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.w0.dtype

    @property
    def device(self) -> torch.device:
        return self.w0.device

    @property
    def n_params(self) -> int:
        return self.w0.numel()

    @property
    def n_examples(self) -> int:
        """Number of training examples (0 for a landscape)."""
        return 0 if self.X is None else self.X.shape[0]

    def _data(self, idx: Optional[Tensor]):
        if idx is None or self.X is None:
            return self.X, self.Y
        return self.X[idx], self.Y[idx]

    # ---- values and derivatives -----------------------------------------------------------------------
    def loss(self, w: Tensor, idx: Optional[Tensor] = None) -> Tensor:
        """Loss averaged over the examples ``idx`` (all when None)."""
        return self._loss_fn(w, *self._data(idx))

    def loss_and_grad(self, w: Tensor, idx: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """(L(w), ∇L(w)) by reverse mode; both detached."""
        if self._fast_loss is not None:
            return self._fast_loss(w, *self._data(idx))
        with torch.enable_grad():
            w = w.detach().requires_grad_(True)
            value = self.loss(w, idx)
            (g,) = torch.autograd.grad(value, w)
        return value.detach(), g

    def grad(self, w: Tensor, idx: Optional[Tensor] = None) -> Tensor:
        return self.loss_and_grad(w, idx)[1]

    def hvp(self, w: Tensor, v: Tensor, idx: Optional[Tensor] = None) -> Tensor:
        """Hessian-vector product H(w) v, forward-over-reverse (jvp of grad)."""
        X, Y = self._data(idx)
        return jvp(grad(lambda u: self._loss_fn(u, X, Y)), (w.detach(),), (v,))[1]

    def per_example_losses(self, w: Tensor, idx: Optional[Tensor] = None) -> Tensor:
        X, Y = self._require_data(idx)
        return _each_example(lambda x, y: self._loss_fn(w, x[None], y[None]), X, Y)

    def per_example_grads(self, w: Tensor, idx: Optional[Tensor] = None) -> Tensor:
        """Matrix (n × P) of per-example gradients ∇ℓ_i(w); their mean is ∇L(w)."""
        X, Y = self._require_data(idx)
        one, w = grad(lambda u, x, y: self._loss_fn(u, x[None], y[None])), w.detach()
        return _each_example(lambda x, y: one(w, x, y), X, Y)

    def outputs(self, w: Tensor, X: Optional[Tensor] = None) -> Tensor:
        """Model outputs f(x; w) on X (the training inputs when None)."""
        if self._output_fn is None:
            raise ValueError("this problem has no model outputs (it is a closed-form landscape)")
        return self._output_fn(w, self.X if X is None else X)

    def _require_data(self, idx):
        if self.X is None:
            raise ValueError("this problem has no data: per-example quantities are not defined for a landscape")
        if self.meta.get("batch_statistics"):
            raise ValueError("per-example losses and gradients are not defined for a module that normalizes by batch "
                             "statistics (BatchNorm in training mode): pass module.eval() to Problem.from_module")
        return self._data(idx)

    def __repr__(self) -> str:
        kind = self.meta.get("model", "custom")
        return (f"Problem({kind}, n_params={self.n_params}, n_examples={self.n_examples}, "
                f"dtype={str(self.dtype).removeprefix('torch.')}, device={self.device})")


def _examples(data) -> tuple:
    """(X, Y) of every example of a ``torch.utils.data`` Dataset or DataLoader of (input, target) pairs, in the
    dataset's order; anything else without Y is a one-line error."""
    from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset, default_collate
    dataset = data.dataset if isinstance(data, DataLoader) else data
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2:
        return dataset.tensors
    if not isinstance(dataset, Dataset):
        raise ValueError("Y: required (the targets), unless X is a torch Dataset or DataLoader of (input, target) "
                         "pairs")
    items = list(dataset) if isinstance(dataset, IterableDataset) else [dataset[i] for i in range(len(dataset))]
    if not items or not all(isinstance(item, (tuple, list)) and len(item) == 2 for item in items):
        raise ValueError(f"X: a {type(data).__name__} whose examples are not (input, target) pairs, or none")
    try:
        return tuple(default_collate(items))
    except (TypeError, RuntimeError) as e:  # PIL images without a ToTensor transform, ragged inputs
        raise ValueError(f"X: the examples of this {type(data).__name__} do not stack into tensors: "
                         f"{str(e).splitlines()[0]}") from None


def _as_tensor(key: str, data) -> Tensor:
    """A tensor, array or list as a tensor; strings or other objects, and anything else (a tuple of inputs, a
    dict), in one line."""
    try:
        return torch.as_tensor(data)
    except (TypeError, ValueError, RuntimeError):
        kind = data.dtype if isinstance(data, np.ndarray) else None
        if isinstance(data, list):
            try:
                kind = np.asarray(data).dtype
            except ValueError:  # ragged rows
                pass
        if kind is not None and kind.kind in "OUS":
            fix = ("class labels as integers 0..C-1, e.g. np.unique(Y, return_inverse=True)[1]" if key == "Y" else
                   "numeric inputs")
            raise ValueError(f"{key}: holds {kind} values (strings or objects), not numbers; pass {fix}") from None
        raise ValueError(f"{key}: must be one tensor or array with a row per example, not this {type(data).__name__} "
                         "(for a module with several inputs, wrap it to take one)") from None


def _takes_as_is(module: torch.nn.Module, X: Tensor) -> bool:
    """Whether the module runs on a few rows of X as they are (integer token ids for an embedding; integer
    features for a linear layer do not)."""
    try:
        with torch.no_grad():
            module(X[:16])
    except Exception:  # whatever the module raises on integers; cast, a real fault then shows on floats
        return False
    return True


def _check_module_and_data(module: torch.nn.Module, X: Tensor, Y: Tensor, loss) -> None:
    """One-line errors for a module whose output is random, and for data that do not fit the module and the loss
    (see ``Problem.from_module``)."""
    if X.ndim == 0 or X.shape[0] == 0:
        raise ValueError(f"X: no examples (shape {tuple(X.shape)})")
    if Y.ndim == 0 or X.shape[0] != Y.shape[0]:
        raise ValueError(f"X and Y: {X.shape[0]} inputs but {Y.shape[0] if Y.ndim else 'a scalar as'} targets")
    for key, a in (("X", X), ("Y", Y)):
        bad = torch.nonzero(~torch.isfinite(a.reshape(len(a), -1)).all(1)) if a.is_floating_point() else []
        if len(bad):
            raise ValueError(f"{key}: NaN or inf values in {len(bad)} row(s), the first at row {bad[0].item()}")
    with torch.no_grad():  # a few examples: BatchNorm in training mode refuses one, and dropout may spare two
        out = module(X[:16])
        if not isinstance(out, Tensor):
            raise ValueError(f"module: returns {type(out).__name__}, not one tensor; flowsim needs the output the loss "
                             "reads (wrap the module so that forward returns it)")
        if not torch.allclose(out, module(X[:16]), rtol=1e-3, atol=1e-3 * out.abs().max().item()):  # not rounding
            raise ValueError("module: two calls at the same weights give different outputs (dropout in training "
                             "mode?); flowsim needs the loss as a function of the weights: pass module.eval()")
    if callable(loss):
        _check_criterion(loss, out, Y[:16])
    elif loss == "ce" and out.shape[-1] == 1:  # a one-logit binary classifier (BCEWithLogitsLoss's)
        raise ValueError("module: one output, and the ce loss is a softmax over one output per class; for two "
                         "classes give it 2 outputs (ce over logits z0, z1 is the logistic loss of z1 - z0), or pass "
                         "loss=torch.nn.BCEWithLogitsLoss() with float targets of its shape")
    elif loss == "ce":
        labels = (Y.shape[0], *out.shape[1:-1])  # the output without its class dimension
        if Y.dtype.is_floating_point or tuple(Y.shape) != labels:
            if Y.ndim == 2 and tuple(Y.shape) == (*labels, 1):
                hint = "; a column of labels: pass Y.reshape(-1)"
            elif tuple(Y.shape) == labels and bool((Y == Y.round()).all()):
                hint = "; labels stored as floats: pass Y.long()"
            elif tuple(Y.shape[1:]) == tuple(out.shape[1:]):
                hint = "; one-hot rows: pass Y.argmax(-1) (class probabilities: loss=torch.nn.CrossEntropyLoss())"
            else:
                hint = ""
            raise ValueError(f"Y: the ce loss takes integer class labels of shape {labels}, got shape "
                             f"{tuple(Y.shape)} of {Y.dtype}{hint}")
        if Y.min() < 0 or Y.max() >= out.shape[-1]:
            raise ValueError(f"Y: class labels must be in 0..{out.shape[-1] - 1} (the model has {out.shape[-1]} "
                             f"outputs), got {Y.min().item()}..{Y.max().item()}")
    elif tuple(Y.shape[1:]) != tuple(out.shape[1:]):
        shape = (Y.shape[0], *out.shape[1:])
        if not Y.is_floating_point() and Y.ndim == 1 and out.ndim == 2 and out.shape[1] > 1:
            hint = (f"integer labels: one-hot them, torch.nn.functional.one_hot(Y, {out.shape[1]}), or use "
                    "loss='ce'")
        elif Y.numel() == math.prod(shape):
            hint = f"reshape Y, e.g. Y.reshape{shape}"
        else:
            hint = "Y holds a target of the output's shape per example"
        raise ValueError(f"Y: shape {tuple(Y.shape)} does not match the model's output shape {shape} for the mse "
                         f"loss ({hint})")


def _each_example(fn: Callable[[Tensor, Tensor], Tensor], X: Tensor, Y: Tensor) -> Tensor:
    """fn(x, y) for every example, stacked: vmapped, or one example at a time where the module has an operation
    that vmap cannot batch (torch.nn.LSTM, GRU and RNN: "Batching rule not implemented for aten::lstm.input", or a
    shape error from their hidden state). Where the loop fails too, its error is the one raised."""
    try:
        return vmap(fn)(X, Y)
    except RuntimeError:
        return torch.stack([fn(x, y) for x, y in zip(X, Y)])


def _check_criterion(criterion: Callable, out: Tensor, Y: Tensor) -> None:
    """One-line errors for a user's criterion that fails on the module's output and Y, returns no finite scalar
    (reduction='none'), or does not average over the examples (reduction='sum'): minibatch losses, their
    gradients and the per-example ones would not be what the rules and flows take them to be."""
    try:
        value = criterion(out, Y)
    except Exception as e:
        raise ValueError(f"loss: fails on the module's output {tuple(out.shape)} and Y {tuple(Y.shape)} of {Y.dtype}: "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if not isinstance(value, Tensor) or value.ndim != 0:
        got = f"shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"loss: must return the mean loss over the examples as a scalar tensor, got {got} "
                         "(reduction='none'?)")
    if len(out) > 1:
        parts = torch.stack([criterion(out[i:i + 1], Y[i:i + 1]) for i in range(len(out))])
        if not torch.allclose(value, parts.mean(), rtol=1e-5, atol=0):
            try:
                paired = torch.broadcast_shapes(out.shape, Y.shape)
            except RuntimeError:
                paired = out.shape
            if Y.is_floating_point() and paired != out.shape:  # (n, 1) against (n,) pairs every output with every y
                raise ValueError(f"loss: the module's output {tuple(out.shape)} and Y {tuple(Y.shape)} broadcast to "
                                 f"{tuple(paired)} in the criterion; give Y the output's shape "
                                 f"(Y.reshape({', '.join(str(d) if i else '-1' for i, d in enumerate(out.shape))}))")
            raise ValueError(f"loss: returns {value.item():.6g} on {len(out)} examples whose own losses average "
                             f"{parts.mean().item():.6g}; it must be their mean (reduction='mean', not 'sum')")


def _flat_parameter_loss(module, names, sizes, shapes, w0, criterion) -> Callable:
    """The hot path of ``loss_and_grad`` for modules: a copy of the module whose parameters are views of one
    flat leaf tensor, so a step costs a copy of w plus a plain forward/backward (no re-parametrization). A
    parameter tied to another (one tensor under two names; ``names`` holds the first) takes the same view under
    every name. The leaf is shared state: one Problem must not evaluate gradients from two threads at once."""
    import copy
    fast = copy.deepcopy(module)
    flat = w0.clone().requires_grad_(True)
    parameters = dict(fast.named_parameters())
    views, offset = {}, 0
    for name, size, shape in zip(names, sizes, shapes):
        views[id(parameters[name])] = flat[offset:offset + size].view(shape)
        offset += size
    for name, parameter in list(fast.named_parameters(remove_duplicate=False)):
        if id(parameter) in views:
            owner, _, attr = name.rpartition(".")
            fast.get_submodule(owner)._parameters[attr] = views[id(parameter)]

    def loss_and_grad(w: Tensor, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            flat.copy_(w)
        with torch.enable_grad():
            value = criterion(fast(x), y)
            (g,) = torch.autograd.grad(value, flat)
        return value.detach(), g
    return loss_and_grad
