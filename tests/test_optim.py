"""flowsim.optim: the edge controller as torch optimizers, equal to the simulator's runs of the same rule and
policy (the same objects run both), exact under state_dict, with one-line errors for what does not apply."""
import copy
import io

import numpy as np
import pytest
import torch

import flowsim
from flowsim.optim import EdgeAdam, EdgeAdamW, EdgeNAdam, EdgeSGD
from flowsim.solvers import EpochSampler

N, STEPS = 64, 40


@pytest.fixture(scope="module")
def data():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(N, 5, generator=gen, dtype=torch.float64)
    Y = torch.tanh(X @ torch.randn(5, 2, generator=gen, dtype=torch.float64))  # a teacher the net can learn
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2)).double()
    return X, Y, net


def train(model, opt, X, Y, batches, steps):
    """The user's loop: one closure per step on the step's batch (all examples where ``batches`` is None)."""
    lrs = []
    for k in range(steps):
        idx = slice(None) if batches is None else batches.indices(k)

        def closure():
            opt.zero_grad()
            loss = 0.5 * (model(X[idx]) - Y[idx]).pow(2).sum(1).mean()  # flowsim's mse: ½‖f − y‖², mean
            loss.backward()
            return loss
        opt.step(closure)
        lrs.append(opt.param_groups[0]["lr"])
    return np.array(lrs), torch.nn.utils.parameters_to_vector(model.parameters()).detach()


@pytest.mark.parametrize("rule, make, hyper, batch", [
    ("gd", lambda p: EdgeSGD(p), {}, None),
    ("adam", lambda p: EdgeAdam(p, betas=(0.9, 0.99)), {"beta1": 0.9, "beta2": 0.99}, None),
    ("momentum", lambda p: EdgeSGD(p, momentum=0.9), {"beta1": 0.9}, 16),
    ("adam", lambda p: EdgeAdam(p), {}, 16),
    ("nesterov", lambda p: EdgeSGD(p, momentum=0.9, nesterov=True), {"beta1": 0.9}, 16),
    ("nadam", lambda p: EdgeNAdam(p), {}, None),
    ("adamw", lambda p: EdgeAdamW(p, weight_decay=0.1), {"weight_decay": 0.1}, 16),
])
def test_the_optimizer_reproduces_the_simulator_run(data, rule, make, hyper, batch):
    """Full batch, and a minibatch loop over the simulator's own batches: every step size and the final weights
    agree to 1e-10."""
    X, Y, net = data
    problem = flowsim.Problem.from_module(net, X, Y, loss="mse", device="cpu")
    policy = "edge"
    ds = flowsim.simulate(problem, rule=rule, process="discrete", step_size=policy, steps=STEPS, batch_size=batch,
                          seed=3, record={"every": 1, "projection_dim": 0, "keep_weights": STEPS}, **hyper)
    model = copy.deepcopy(net)
    batches = None if batch is None else EpochSampler(N, batch, 3, torch.device("cpu"))
    lrs, w = train(model, make(model.parameters()), X, Y, batches, STEPS)
    np.testing.assert_allclose(lrs, ds.step_size.values[0, :STEPS], rtol=1e-10)
    np.testing.assert_allclose(w.numpy(), ds.w.values[0, -1], rtol=0, atol=1e-10)
    assert ds.loss.values[0, -1] < 0.5 * ds.loss.values[0, 0]  # and it trains


def test_state_dict_resumes_bit_for_bit(data):
    X, Y, net = data
    batches = EpochSampler(N, 16, 0, torch.device("cpu"))
    model = copy.deepcopy(net)
    opt = EdgeAdam(model.parameters(), every=3)
    _, straight = train(model, opt, X, Y, batches, 25)

    model = copy.deepcopy(net)
    opt = EdgeAdam(model.parameters(), every=3)
    train(model, opt, X, Y, batches, 11)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_model = copy.deepcopy(net)
    resumed_model.load_state_dict(saved["model"])
    resumed = EdgeAdam(resumed_model.parameters(), every=3)
    resumed.load_state_dict(saved["opt"])

    class Shifted:  # the batches from step 11 on
        def indices(self, k):
            return batches.indices(k + 11)
    _, w = train(resumed_model, resumed, X, Y, Shifted(), 14)
    assert torch.equal(w, straight)


def test_a_state_of_another_rule_or_other_sizes_is_refused_in_one_line_and_nothing_is_loaded(data):
    """Adam's state loaded into EdgeSGD was taken silently, and a state over other layer sizes failed at the next
    step (a size mismatch inside the rule). Both are one line at load time; the optimizer keeps its own state and
    trains on as if nothing had been tried."""
    X, Y, net = data
    saved_model = copy.deepcopy(net)
    saved = EdgeAdam(saved_model.parameters())
    train(saved_model, saved, X, Y, None, 3)
    wider = torch.nn.Sequential(torch.nn.Linear(5, 32), torch.nn.Tanh(), torch.nn.Linear(32, 2)).double()
    refusals = ((EdgeSGD, net, r"^state_dict: saved by an optimizer of rule 'adam'; this one runs 'gd'$"),
                (EdgeAdam, wider, r"^state_dict: saved over trainable parameters of sizes \[80, 16, 32, 2\]; these "
                                  r"have \[160, 32, 64, 2\]$"))
    for make, module, message in refusals:
        model, straight_model = copy.deepcopy(module), copy.deepcopy(module)
        opt, straight = make(model.parameters()), make(straight_model.parameters())
        train(model, opt, X, Y, None, 2)
        train(straight_model, straight, X, Y, None, 2)
        with pytest.raises(ValueError, match=message):
            opt.load_state_dict(saved.state_dict())
        lrs, w = train(model, opt, X, Y, None, 3)
        straight_lrs, straight_w = train(straight_model, straight, X, Y, None, 3)
        np.testing.assert_array_equal(lrs, straight_lrs)
        assert torch.equal(w, straight_w)


def test_a_closure_with_dropout_measures_the_curvature_of_one_mask_and_draws_as_if_called_once(data):
    """Dropout draws a mask at every call of the closure. The controller's products are differences of the
    closure's gradients, so every call of a step replays the random state the step began with: the first
    estimate is λ_max of the Hessian of the loss under the one mask the step draws (dense eigvalsh in float64, by
    torch.autograd.functional.hessian under that state; to 1e-5 relative, the products' differences erring by
    ~1e-8). Drawing a new mask per call, the same estimate was the masks' difference over ε (off by orders of
    magnitude). And the random stream after each step is the one a single call per step leaves
    (torch.optim.SGD's), for every step, estimating or not."""
    X, Y, net = data
    torch.manual_seed(1)
    model = torch.nn.Sequential(net[0], net[1], torch.nn.Dropout(0.3), net[2])
    names = [name for name, _ in model.named_parameters()]
    w0 = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    shapes = [p.shape for p in model.parameters()]

    def loss_at(w):
        chunks = torch.split(w, [int(np.prod(s)) for s in shapes])
        params = {n: c.reshape(s) for n, c, s in zip(names, chunks, shapes)}
        out = torch.func.functional_call(model, params, (X,))
        return 0.5 * (out - Y).pow(2).sum(1).mean()

    torch.manual_seed(7)
    H = torch.autograd.functional.hessian(loss_at, w0)
    expected = torch.linalg.eigvalsh(H)[-1].item()

    def run(opt, steps):
        torch.manual_seed(7)
        draws = []
        for _ in range(steps):
            def closure():
                opt.zero_grad()
                loss = 0.5 * (model(X) - Y).pow(2).sum(1).mean()
                loss.backward()
                return loss
            opt.step(closure)
            draws.append(torch.rand(1).item())
        return draws

    edge = EdgeSGD(model.parameters(), eig_tol=1e-9, every=3)
    with_edge = run(edge, 1)
    S = edge.state[next(iter(model.parameters()))]["policy"]["S"]
    assert S == pytest.approx(expected, rel=1e-5)
    torch.nn.utils.vector_to_parameters(w0, model.parameters())
    with_edge = run(EdgeSGD(model.parameters(), every=3), 8)
    torch.nn.utils.vector_to_parameters(w0, model.parameters())
    assert with_edge == run(torch.optim.SGD(model.parameters(), lr=1e-3), 8)


def test_frozen_parameters_are_left_out_of_the_step_and_of_the_curvature(data):
    """A frozen first layer among model.parameters(): the first estimate of EdgeSGD is λ_max of the Hessian in
    the trainable weights (dense eigvalsh in float64, to 1e-5 relative with the products' ~1e-8 error; with the
    frozen ones in, a product's frozen rows were 0 and the operator not symmetric: 1 % off here, 100x under
    Adam's preconditioner); EdgeAdam over all parameters takes the simulator's steps on the Problem of the same
    module (whose w is its trainable parameters) to 1e-10, and leaves the frozen layer as it was. Freezing
    another parameter after the first step is a one-line error."""
    X, Y, net = data
    model = copy.deepcopy(net)
    model[0].requires_grad_(False)
    frozen = [t.detach().clone() for t in model[0].parameters()]
    trainable = [model[2].weight, model[2].bias]

    def loss_at(w):
        weight, bias = w[:32].view(2, 16), w[32:]
        return 0.5 * (torch.tanh(model[0](X)) @ weight.T + bias - Y).pow(2).sum(1).mean()

    w0 = torch.cat([t.detach().reshape(-1) for t in trainable])
    expected = torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss_at, w0))[-1].item()
    opt = EdgeSGD(model.parameters(), eig_tol=1e-9)
    train(model, opt, X, Y, None, 1)
    assert opt.state[next(iter(model.parameters()))]["policy"]["S"] == pytest.approx(expected, rel=1e-5)

    model = copy.deepcopy(net)
    model[0].requires_grad_(False)
    problem = flowsim.Problem.from_module(model, X, Y, loss="mse", device="cpu")
    ds = flowsim.simulate(problem, rule="adam", process="discrete", step_size="edge", steps=STEPS,
                          record={"every": 1, "projection_dim": 0, "keep_weights": STEPS})
    opt = EdgeAdam(model.parameters())
    lrs, _ = train(model, opt, X, Y, None, STEPS)
    np.testing.assert_allclose(lrs, ds.step_size.values[0, :STEPS], rtol=1e-10)
    w = torch.cat([t.detach().reshape(-1) for t in model[2].parameters()])
    np.testing.assert_allclose(w.numpy(), ds.w.values[0, -1], rtol=0, atol=1e-10)
    assert all(torch.equal(a, b) for a, b in zip(frozen, model[0].parameters()))
    model[2].bias.requires_grad_(False)
    with pytest.raises(ValueError, match=r"^params: which parameters require grad changed after the first step"):
        train(model, opt, X, Y, None, 1)


def test_a_closure_may_return_the_loss_as_a_number_after_its_own_backward(data):
    """As torch.optim.LBFGS takes it: the same steps as the closure that returns the tensor, bit for bit; a closure
    that returns nothing, or a number without a gradient, is a one-line error."""
    X, Y, net = data
    runs = []
    for as_number in (False, True):
        model = copy.deepcopy(net)
        opt = EdgeAdam(model.parameters(), every=3)
        lrs = []
        for _ in range(8):
            def closure():
                opt.zero_grad()
                loss = 0.5 * (model(X) - Y).pow(2).sum(1).mean()
                loss.backward()
                return loss.item() if as_number else loss
            opt.step(closure)
            lrs.append(opt.param_groups[0]["lr"])
        runs.append((lrs, torch.nn.utils.parameters_to_vector(model.parameters()).detach()))
    assert runs[0][0] == runs[1][0] and torch.equal(runs[0][1], runs[1][1])
    opt = EdgeAdam(copy.deepcopy(net).parameters())
    for returned in (None, 1.0):
        with pytest.raises(ValueError, match=r"^closure: returned .* and no gradient") as refused:
            opt.step(lambda: returned)
        assert "\n" not in str(refused.value)


def test_an_lr_changed_outside_the_optimizer_is_refused_in_one_line(data):
    """A scheduler (StepLR, ×0.1 every 2 steps) writes param_groups' lr after a step; the controller would set η
    itself at the next, ignoring it while param_groups showed it. Steps 0 and 1 run (the scheduler leaves lr as
    the controller set it), and step 2, after the scheduler's first change, is refused in one line naming max_lr;
    so is a step after a hand-set lr. A state_dict round trip keeps the two in agreement."""
    X, Y, net = data
    model = copy.deepcopy(net)
    opt = EdgeAdam(model.parameters())
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.1)

    def closure():
        opt.zero_grad()
        loss = 0.5 * (model(X) - Y).pow(2).sum(1).mean()
        loss.backward()
        return loss
    for _ in range(2):
        opt.step(closure)
        scheduler.step()
    with pytest.raises(ValueError, match=r"^lr: param_groups\[0\]\['lr'\] was changed outside .*max_lr") as refused:
        opt.step(closure)
    assert "\n" not in str(refused.value)
    opt = EdgeAdam(model.parameters())
    opt.step(closure)
    resumed = EdgeAdam(model.parameters())
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    resumed.step(closure)
    resumed.param_groups[0]["lr"] = 0.1
    with pytest.raises(ValueError, match=r"^lr: param_groups"):
        resumed.step(closure)


def test_what_does_not_apply_to_an_optimizer_is_one_line(data):
    params = list(copy.deepcopy(data[2]).parameters())
    with pytest.raises(ValueError, match=r"^hvp: does not apply to EdgeSGD"):
        EdgeSGD(params, hvp="difference")
    with pytest.raises(ValueError, match=r"^hvp: does not apply to EdgeAdam"):
        EdgeAdam(params, hvp="reverse")
    with pytest.raises(ValueError, match=r"^weight_decay: does not apply to EdgeAdam \(only EdgeAdamW"):
        EdgeAdam(params, weight_decay=0.01)
    with pytest.raises(ValueError, match=r"^betas: a pair \(beta1, beta2\), got \(0\.9,\)"):
        EdgeNAdam(params, betas=(0.9,))
    assert EdgeAdam(params, betas=np.array([0.8, 0.99])).rule == EdgeAdam(params, betas=(0.8, 0.99)).rule
    # torch.optim's own keys name what each optimizer takes (they read "Extra inputs are not permitted")
    with pytest.raises(ValueError, match=r"^amsgrad: not an option of EdgeAdam \(it takes betas, eps, c, max_lr, "
                                         r"every, early, guard, shrink, growth, eig_tol, max_products\)$"):
        EdgeAdam(params, amsgrad=True)
    with pytest.raises(ValueError, match=r"^foreach: not an option of EdgeSGD \(it takes momentum, heavy_ball, "
                                         r"nesterov, c, max_lr, "):
        EdgeSGD(params, foreach=True)
    assert EdgeAdamW(params, weight_decay=0.01).rule.weight_decay == 0.01
    with pytest.raises(ValueError, match=r"^params: one parameter group"):
        EdgeAdam([{"params": params[:1]}, {"params": params[1:]}])
    opt = EdgeAdam(params[:1])
    with pytest.raises(ValueError, match=r"^params: one parameter group .* a new optimizer"):
        opt.add_param_group({"params": params[1:]})  # it would be left untrained
    assert len(opt.param_groups) == 1
    with pytest.raises(ValueError, match=r"^c: "):
        EdgeSGD(params, c=3.0)
    with pytest.raises(ValueError, match=r"^closure: required"):
        EdgeSGD(params).step(None)
    with pytest.raises(ValueError, match=r"^closure: required") as missing:
        EdgeAdam(params).step()
    assert "\n" not in str(missing.value)
    model = copy.deepcopy(data[2])
    with pytest.raises(ValueError, match=r"^closure: returned a loss of shape \(8, 2\); it must return the batch's "
                                         r"loss as one number"):  # torch: 'grad can be implicitly created only ...'
        EdgeAdam(model.parameters()).step(lambda: model(data[0][:8]).pow(2))
    for dtype in (torch.bfloat16, torch.float16):  # S read 0 (bfloat16) or NaN (float16), and η was ∞
        low = [p.detach().to(dtype).requires_grad_() for p in params]
        with pytest.raises(ValueError, match=rf"^params: {str(dtype)[6:]}: .* need float32 or float64 parameters "
                                             r".*torch.autocast\)$"):
            EdgeAdam(low)


def test_a_sparse_gradient_is_refused_in_one_line():
    """nn.Embedding(sparse=True) gives a sparse .grad, which the flat vector cannot hold (torch's own message was
    'reshape is not implemented for sparse tensors')."""
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4, sparse=True), torch.nn.Flatten(), torch.nn.Linear(20, 3))
    X, Y = torch.randint(0, 10, (30, 5)), torch.randint(0, 3, (30,))
    opt = EdgeAdam(model.parameters())

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(X), Y)
        loss.backward()
        return loss
    with pytest.raises(ValueError, match=r"^params: a sparse gradient \(nn.Embedding\(sparse=True\)\?\)"):
        opt.step(closure)


@pytest.mark.parametrize("make", [EdgeAdam, EdgeSGD])
def test_lr_is_refused_in_one_line_naming_max_lr(data, make):
    """A step size would either be ignored or silently turn the controller into a constant step: refused, with
    the keys that do bound and scale η."""
    params = list(copy.deepcopy(data[2]).parameters())
    with pytest.raises(ValueError, match=r"^lr: .*max_lr=") as refused:
        make(params, lr=1e-3)
    assert "\n" not in str(refused.value)
    assert make(params, max_lr=1e-3).policy.max_lr == 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_it_takes_the_cpu_steps(data):
    X, Y, net = data
    runs = []
    for device in ("cpu", "cuda"):
        model = copy.deepcopy(net).to(device)
        lrs, w = train(model, EdgeAdam(model.parameters()), X.to(device), Y.to(device), None, 10)
        runs.append((lrs, w.cpu()))
    np.testing.assert_allclose(runs[0][0], runs[1][0], rtol=1e-8)
    torch.testing.assert_close(runs[0][1], runs[1][1], rtol=1e-7, atol=1e-9)
