"""Problem: derivatives against dense and finite-difference references, data handling, construction."""
import copy
import math

import numpy as np
import pytest
import torch

import flowsim
from flowsim.models import build_problem
from flowsim.models.problem import Problem


def test_per_example_gradients_average_to_full_gradient(tiny_mlp_problem):
    p = tiny_mlp_problem
    G = p.per_example_grads(p.w0)
    assert G.shape == (p.n_examples, p.n_params)
    torch.testing.assert_close(G.mean(0), p.grad(p.w0), rtol=0, atol=1e-10)
    torch.testing.assert_close(p.per_example_losses(p.w0).mean(), p.loss(p.w0), rtol=0, atol=1e-12)


def test_hvp_equals_dense_hessian_times_v(tiny_mlp_problem):
    p = tiny_mlp_problem
    v = torch.randn(p.n_params, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    H = torch.func.hessian(p.loss)(p.w0)
    torch.testing.assert_close(p.hvp(p.w0, v), H @ v, rtol=1e-10, atol=1e-12)


def test_hvp_matches_finite_differences_of_the_gradient(tiny_mlp_problem):
    p = tiny_mlp_problem
    v = torch.randn(p.n_params, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    v /= v.norm()
    eps = 1e-5  # central differences: truncation O(eps²), round-off O(1e-16/eps)
    fd = (p.grad(p.w0 + eps * v) - p.grad(p.w0 - eps * v)) / (2 * eps)
    hv = p.hvp(p.w0, v)
    assert (fd - hv).norm() / hv.norm() < 1e-8


def test_minibatch_gradient_is_the_mean_over_its_examples(tiny_mlp_problem):
    p = tiny_mlp_problem
    idx = torch.tensor([3, 17, 42, 5])
    loss, g = p.loss_and_grad(p.w0, idx)
    torch.testing.assert_close(g, p.per_example_grads(p.w0, idx).mean(0), rtol=0, atol=1e-12)
    torch.testing.assert_close(loss, p.per_example_losses(p.w0)[idx].mean(), rtol=0, atol=1e-12)


def test_flat_vector_is_parameters_to_vector_order_and_mse_is_half_squared_error():
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    X, Y = torch.randn(10, 3), torch.randn(10, 2)
    p = flowsim.Problem.from_module(module, X, Y, loss="mse", dtype="float64", device="cpu")
    w = torch.nn.utils.parameters_to_vector(module.parameters())  # the caller's module stays float32
    torch.testing.assert_close(p.w0, w.detach().double())
    reference = module.double()  # the same module in float64 (the Problem converted a copy)
    expected = 0.5 * ((reference(X.double()) - Y.double()) ** 2).sum(1).mean()
    torch.testing.assert_close(p.loss(p.w0), expected.detach())
    torch.testing.assert_close(p.outputs(p.w0), reference(X.double()).detach())


def test_cross_entropy_matches_torch():
    torch.manual_seed(0)
    module = torch.nn.Linear(5, 3)
    X, y = torch.randn(20, 5), torch.randint(0, 3, (20,))
    p = flowsim.Problem.from_module(module, X, y, loss="ce", dtype="float64", device="cpu")
    expected = torch.nn.functional.cross_entropy(module.double()(X.double()), y)
    torch.testing.assert_close(p.loss(p.w0), expected.detach())


@pytest.mark.parametrize("name,point,value", [
    ("xyzw", [1.0, 2.0, 0.5, 3.0], 0.5 * (1 - 3.0) ** 2),
    ("x2y2", [2.0, 0.5], 0.0),
    ("xy", [3.0, 1.0], 0.5 * (1 - 3.0) ** 2),
])
def test_landscapes_have_their_closed_form(name, point, value):
    p = build_problem({"model": name, "init": point}, device="cpu")
    assert p.loss(p.w0).item() == pytest.approx(value, abs=1e-14)
    with pytest.raises(flowsim.ScenarioError, match="^batch_size: this problem has no data to batch"):
        flowsim.simulate(p, "gd", "discrete", 0.1, 2, batch_size=1)


def test_quadratic_hessian_is_its_spectrum():
    p = build_problem({"model": "quadratic", "spectrum": [3.0, 1.0, 0.5]}, device="cpu")
    torch.testing.assert_close(torch.func.hessian(p.loss)(p.w0), torch.diag(torch.tensor([3.0, 1.0, 0.5],
                                                                                             dtype=torch.float64)))


def test_initialization_is_seeded_and_shared_across_dtypes():
    spec = {"model": "mlp", "widths": [8], "dataset": "digits", "n_train": 50}
    a, b = build_problem(spec, seed=3, device="cpu"), build_problem(spec, seed=3, device="cpu")
    c = build_problem(spec, seed=4, device="cpu")
    f32 = build_problem(spec, seed=3, dtype="float32", device="cpu")
    assert torch.equal(a.w0, b.w0) and not torch.equal(a.w0, c.w0)
    torch.testing.assert_close(f32.w0.double(), a.w0)


def test_digits_are_standardized_and_class_subsets_relabelled():
    p = build_problem({"model": "mlp", "widths": [4], "dataset": "digits", "classes": [3, 7], "n_train": 100,
                       "loss": "ce"}, device="cpu")
    X = p.X.numpy()
    assert set(np.unique(p.Y.numpy())) == {0, 1}
    np.testing.assert_allclose(X.mean(0), 0, atol=1e-12)
    assert np.all((np.abs(X.std(0) - 1) < 1e-12) | (X.std(0) == 0))


def test_npz_dataset_and_init_file(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", X=rng.standard_normal((30, 4)), Y=rng.integers(0, 3, 30))
    spec = {"model": "mlp", "widths": [5], "dataset": {"path": str(tmp_path / "d.npz")}, "loss": "mse"}
    p = build_problem(spec, device="cpu")
    assert p.Y.shape == (30, 3) and torch.all(p.Y.sum(1) == 1)
    w0 = rng.standard_normal(p.n_params)
    np.save(tmp_path / "w0.npy", w0)
    q = build_problem({**spec, "init": {"path": str(tmp_path / "w0.npy")}}, device="cpu")
    np.testing.assert_array_equal(q.w0.numpy(), w0)
    # cross-entropy takes integer labels: one-hot rows are refused in one line that says how to convert them
    np.savez(tmp_path / "onehot.npz", X=rng.standard_normal((30, 4)), Y=np.eye(3)[rng.integers(0, 3, 30)])
    with pytest.raises(ValueError, match=r"^problem\.loss: 'ce' needs integer class labels, .*float64 of shape "
                                         r"\(30, 3\).*Y\.argmax\(1\)"):
        build_problem({**spec, "loss": "ce", "dataset": {"path": str(tmp_path / "onehot.npz")}}, device="cpu")
    with pytest.raises(ValueError, match=r"^problem\.loss: .*: teacher_student is a regression set: use loss mse$"):
        build_problem({**spec, "loss": "ce", "dataset": {"name": "teacher_student"}}, device="cpu")


def test_teacher_student_is_seeded():
    spec = {"model": "mlp", "widths": [4], "dataset": {"name": "teacher_student", "dim": 5, "seed": 1},
            "n_train": 40}
    a, b = build_problem(spec, device="cpu"), build_problem(spec, device="cpu")
    c = build_problem({**spec, "dataset": {"name": "teacher_student", "dim": 5, "seed": 2}}, device="cpu")
    assert torch.equal(a.Y, b.Y) and not torch.equal(a.Y, c.Y)


def test_from_module_refuses_a_1d_target_for_a_one_output_model_instead_of_broadcasting():
    """MSE of a Linear(8, 1) on Y of shape (100,) would broadcast (100, 1) − (100,) to 100 × 100 residuals."""
    gen = torch.Generator().manual_seed(0)
    X, Y = torch.randn(100, 8, generator=gen), torch.randn(100, generator=gen)
    module = torch.nn.Linear(8, 1)
    with pytest.raises(ValueError, match=r"^Y: shape \(100,\) does not match the model's output shape \(100, 1\) "
                                         r"for the mse loss \(reshape Y, e.g. Y.reshape\(100, 1\)\)$"):
        Problem.from_module(module, X, Y, loss="mse")
    # the hint fits what Y holds (it advised Y[:, None] for integer labels against 3 outputs)
    labels = (Y > 0).long() + (Y > 1).long()
    with pytest.raises(ValueError, match=r"\(integer labels: one-hot them, torch.nn.functional.one_hot\(Y, 3\), or "
                                         r"use loss='ce'\)$"):
        Problem.from_module(torch.nn.Linear(8, 3), X, labels, loss="mse")
    with pytest.raises(ValueError, match=r"of torch.float32; labels stored as floats: pass Y.long\(\)$"):
        Problem.from_module(torch.nn.Linear(8, 3), X, labels.float(), loss="ce")
    with pytest.raises(ValueError, match=r"; one-hot rows: pass Y.argmax\(-1\) \(class probabilities: "
                                         r"loss=torch.nn.CrossEntropyLoss\(\)\)$"):
        Problem.from_module(torch.nn.Linear(8, 3), X, torch.nn.functional.one_hot(labels, 3).float(), loss="ce")
    p = Problem.from_module(module, X, Y[:, None], loss="mse", device="cpu")
    with torch.no_grad():
        expected = 0.5 * (module.double()(X.double()) - Y[:, None].double()).pow(2).sum(1).mean()
    assert p.loss(p.w0).item() == pytest.approx(expected.item(), rel=1e-12)
    with pytest.raises(ValueError, match=r"^X and Y: 100 inputs but 99 targets"):
        Problem.from_module(module, X, Y[:99, None], loss="mse")
    with pytest.raises(ValueError, match=r"^Y: the ce loss takes integer class labels of shape \(100,\)"):
        Problem.from_module(torch.nn.Linear(8, 3), X, Y[:, None], loss="ce")
    X[7, 3], Y[2] = math.nan, math.inf  # a NaN input made the random-output check's tolerance NaN: a traceback
    with pytest.raises(ValueError, match=r"^X: NaN or inf values in 1 row\(s\), the first at row 7$"):
        Problem.from_module(module, X, Y[:, None], loss="mse")
    X[7, 3] = 0.0
    with pytest.raises(ValueError, match=r"^Y: NaN or inf values in 1 row\(s\), the first at row 2$"):
        Problem.from_module(module, X, Y[:, None], loss="mse")


def test_from_module_refuses_what_it_cannot_train_on_in_one_line_and_takes_arrays():
    """Numpy arrays and lists are data as tensors are; a tuple output, labels outside the model's classes, no
    examples and no trainable parameter are one-line errors (they raised AttributeError, IndexError at the first
    loss, or a reshape error; labels out of range passed construction)."""
    gen = torch.Generator().manual_seed(0)
    X, labels = torch.randn(40, 5, generator=gen), torch.randint(0, 3, (40,), generator=gen)
    module = torch.nn.Linear(5, 3)
    p = Problem.from_module(module, X.numpy(), labels.tolist(), loss="ce", device="cpu")
    expected = torch.nn.functional.cross_entropy(module.double()(X.double()), labels)
    assert p.loss(p.w0).item() == pytest.approx(expected.item(), rel=1e-12)

    class Pair(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(5, 3)

        def forward(self, x):
            return self.linear(x), x.sum()
    with pytest.raises(ValueError, match=r"^module: returns tuple, not one tensor"):
        Problem.from_module(Pair(), X, labels, loss="ce")
    for bad, shown in ((labels + 1, "1..3"), (labels - 1, "-1..1")):
        with pytest.raises(ValueError, match=rf"^Y: class labels must be in 0..2 \(the model has 3 outputs\), got "
                                             rf"{shown}$"):
            Problem.from_module(module, X, bad, loss="ce")
    for targets in (labels % 2, (labels % 2).double()):  # a one-logit binary classifier, int or float targets
        with pytest.raises(ValueError, match=r"^module: one output, and the ce loss .* give it 2 outputs"):
            Problem.from_module(torch.nn.Linear(5, 1), X, targets, loss="ce")
    words = np.array(["no", "yes"])[labels.numpy() % 2]  # they were 'must be one tensor or array ... not this ndarray'
    for bad in (words, words.tolist(), words.astype(object)):
        with pytest.raises(ValueError, match=r"^Y: holds \S+ values \(strings or objects\), not numbers; pass class "
                                             r"labels as integers 0..C-1, e.g. np.unique\(Y, return_inverse=True\)"):
            Problem.from_module(module, X, bad, loss="ce")
    with pytest.raises(ValueError, match=r"^X: holds object values .* pass numeric inputs$"):
        Problem.from_module(module, X.numpy().astype(object), labels, loss="ce")
    with pytest.raises(ValueError, match=r"^X: must be one tensor or array with a row per example, not this tuple"):
        Problem.from_module(module, (X, X), labels, loss="ce")
    with pytest.raises(ValueError, match=r"^X: no examples \(shape \(0, 5\)\)$"):
        Problem.from_module(module, X[:0], labels[:0], loss="ce")
    with pytest.raises(ValueError, match=r"^module: no parameter requires grad"):
        Problem.from_module(torch.nn.Linear(5, 3).requires_grad_(False), X, labels, loss="ce")
    with pytest.raises(ValueError, match=r"^Y: the ce loss takes integer class labels of shape \(40,\), got shape "
                                         r"\(40, 1\) of torch.int64; a column of labels: pass Y.reshape\(-1\)$"):
        Problem.from_module(module, X, labels[:, None], loss="ce")
    for bad, shown in ((torch.nn.Linear, "the class Linear"), (lambda x: x, "function")):  # a raw TypeError
        with pytest.raises(ValueError, match=rf"^module: must be a torch.nn.Module instance, got {shown}$"):
            Problem.from_module(bad, X, labels, loss="ce")
    for device in ("mps", "tpu"):  # torch's RuntimeError: no float64 on mps, no such device type
        with pytest.raises(ValueError, match=rf"^device must be auto, cpu or cuda, got '{device}'$"):
            Problem.from_module(module, X, labels, loss="ce", device=device)
    for dtype in (torch.float16, torch.bfloat16, torch.int64, "bfloat16"):  # float16 ran; the others raised deep
        with pytest.raises(ValueError, match=r"^dtype must be one of \['float32', 'float64'\], got "):
            Problem.from_module(module, X, labels, loss="ce", dtype=dtype)
        with pytest.raises(ValueError, match=r"^dtype must be one of "):
            Problem.from_function(lambda w: (w ** 2).sum(), [1.0], dtype=dtype)
    assert Problem.from_module(module, X, labels, loss="ce", dtype=torch.float32, device="cpu").dtype == torch.float32


def test_frozen_parameters_stay_out_of_the_weights():
    """A frozen first layer (requires_grad False) is part of the model, not of w: w is the trainable
    parameters in order, the loss and every derivative path (the flat fast path, torch.func's per-example
    gradients, forward-over-reverse products) agree with torch autograd on the module itself, and a run
    trains w alone (w held every parameter before, so every process trained the frozen layer too)."""
    gen = torch.Generator().manual_seed(0)
    X, Y = torch.randn(30, 6, generator=gen), torch.randn(30, 2, generator=gen)
    module = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).double()
    module[0].requires_grad_(False)
    p = Problem.from_module(module, X, Y, loss="mse", device="cpu")
    trainable = [module[2].weight, module[2].bias]
    assert torch.equal(p.w0, torch.cat([t.detach().reshape(-1) for t in trainable]))
    loss = 0.5 * (module(X.double()) - Y.double()).pow(2).sum(1).mean()
    expected = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, trainable)])
    value, g = p.loss_and_grad(p.w0)
    assert value.item() == pytest.approx(loss.item(), rel=1e-12)
    torch.testing.assert_close(g, expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(p.per_example_grads(p.w0).mean(0), expected, rtol=1e-12, atol=1e-14)
    v = torch.randn(p.n_params, generator=gen, dtype=torch.float64)
    hv = torch.autograd.functional.hvp(lambda w: p.loss(w), p.w0, v)[1]
    torch.testing.assert_close(p.hvp(p.w0, v), hv, rtol=1e-10, atol=1e-12)
    run = flowsim.simulate(p, "gd", "discrete", 0.1, steps=3)
    assert run.loss.values[0, -1] < run.loss.values[0, 0]


def test_a_tied_parameter_moves_under_both_of_its_names():
    """Weight tying (one Parameter in two layers): w holds it once, and the loss and gradient of the fast path
    (every step's) equal torch autograd on the module itself with the tied tensor set to w's values, at w0 and
    at another w. The fast path tied only the first name: the second layer kept w0's weights, and the gradient
    missed its share (0.29 off here)."""
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(6, 6, bias=False), torch.nn.Linear(6, 6)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))
    torch.manual_seed(0)
    module = Tied().double()
    X, Y = torch.randn(20, 6, dtype=torch.float64), torch.randn(20, 6, dtype=torch.float64)
    p = Problem.from_module(module, X, Y, loss="mse", device="cpu")
    assert p.n_params == 36 + 6
    for w in (p.w0, p.w0 + 0.1 * torch.randn(p.n_params, dtype=torch.float64)):
        torch.nn.utils.vector_to_parameters(w, module.parameters())
        loss = 0.5 * (module(X) - Y).pow(2).sum(1).mean()
        expected = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(module.parameters()))])
        value, g = p.loss_and_grad(w)
        assert value.item() == pytest.approx(loss.item(), rel=1e-12)
        torch.testing.assert_close(g, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_per_example_quantities_of_a_recurrent_module_equal_autograd_example_by_example(cell):
    """torch.nn.LSTM and GRU have operations vmap cannot batch (the SDE raised "Batching rule not implemented for
    aten::lstm.input", or a shape error from the hidden state): per-example losses and gradients are then taken one
    example at a time, and each equals torch autograd on the module with that example alone; an SDE runs."""
    gen = torch.Generator().manual_seed(0)
    X, labels = torch.randn(12, 6, 3, generator=gen, dtype=torch.float64), torch.randint(0, 2, (12,), generator=gen)
    torch.manual_seed(0)

    class Recurrent(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.head = getattr(torch.nn, cell)(3, 5, batch_first=True), torch.nn.Linear(5, 2)

        def forward(self, x):
            return self.head(self.rnn(x)[0][:, -1])
    module = Recurrent().double()
    p = Problem.from_module(module, X, labels, loss="ce", device="cpu")
    losses, G = p.per_example_losses(p.w0), p.per_example_grads(p.w0)
    for i in range(len(X)):
        loss = torch.nn.functional.cross_entropy(module(X[i:i + 1]), labels[i:i + 1])
        expected = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(module.parameters()))])
        assert losses[i].item() == pytest.approx(loss.item(), rel=1e-12)
        torch.testing.assert_close(G[i], expected, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(G.mean(0), p.grad(p.w0), rtol=1e-10, atol=1e-13)
    ds = flowsim.simulate(p, "gd", "sde", 0.1, 2, batch_size=4)
    assert ds.loss.values[0, 0] == pytest.approx(p.loss(p.w0).item(), rel=1e-12) and np.isfinite(ds.loss).all()


def test_a_criterion_of_the_users_is_the_loss_of_the_problem_and_of_its_runs():
    """A one-logit binary classifier under torch.nn.BCEWithLogitsLoss() (ce refuses one output): the loss, the
    gradient and the per-example gradients equal torch autograd on the module, and 10 full-batch GD steps through
    flowsim end where torch.optim.SGD's loop ends. A criterion that returns per-example losses or their sum, or
    fails on Y, is refused in one line."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(40, 5, generator=gen, dtype=torch.float64)
    Y = (X[:, :1] + 0.3 * torch.randn(40, 1, generator=gen, dtype=torch.float64) > 0).double()
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()
    criterion = torch.nn.BCEWithLogitsLoss()
    p = Problem.from_module(module, X, Y, loss=criterion, device="cpu")
    assert p.meta["loss"] == "BCEWithLogitsLoss"
    loss = criterion(module(X), Y)
    expected = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(module.parameters()))])
    value, g = p.loss_and_grad(p.w0)
    assert value.item() == pytest.approx(loss.item(), rel=1e-12)
    torch.testing.assert_close(g, expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(p.per_example_grads(p.w0).mean(0), g, rtol=1e-10, atol=1e-14)
    ds = flowsim.simulate(p, "gd", "discrete", 0.5, 10)
    trained = copy.deepcopy(module)
    sgd = torch.optim.SGD(trained.parameters(), lr=0.5)
    for _ in range(10):
        sgd.zero_grad()
        criterion(trained(X), Y).backward()
        sgd.step()
    assert ds.loss.values[0, -1] == pytest.approx(criterion(trained(X), Y).item(), rel=1e-12)
    for bad, message in ((torch.nn.BCEWithLogitsLoss(reduction="sum"), r"returns \S+ on 16 examples whose own losses "
                          r"average \S+; it must be their mean \(reduction='mean', not 'sum'\)$"),
                         (torch.nn.BCEWithLogitsLoss(reduction="none"), r"must return the mean loss over the examples "
                          r"as a scalar tensor, got shape \(16, 1\)"),
                         (torch.nn.NLLLoss(), r"fails on the module's output \(16, 1\) and Y \(16, 1\) of "
                                              r"torch.float64: ")):
        with pytest.raises(ValueError, match="^loss: " + message):
            Problem.from_module(module, X, Y, loss=bad, device="cpu")
    # targets of shape (n,) against outputs (n, 1): MSELoss pairs every output with every target (torch only warns)
    with pytest.raises(ValueError, match=r"^loss: the module's output \(16, 1\) and Y \(16,\) broadcast to "
                                         r"\(16, 16\) in the criterion; give Y the output's shape "
                                         r"\(Y.reshape\(-1, 1\)\)$"):
        Problem.from_module(module, X, Y[:, 0], loss=torch.nn.MSELoss(), device="cpu")


def test_integer_inputs_stay_token_ids_for_an_embedding_and_are_cast_for_a_linear_layer():
    """Integer X: token ids reach an nn.Embedding as integers (they were cast to float64, which the embedding
    refuses), and integer features reach a linear layer cast to the dtype; either loss equals torch's on the
    module, and the per-example gradients (torch.func, vmapped over the ids) average to the gradient."""
    gen = torch.Generator().manual_seed(0)
    tokens, labels = torch.randint(0, 10, (30, 5), generator=gen), torch.randint(0, 3, (30,), generator=gen)
    torch.manual_seed(0)
    embed = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Flatten(), torch.nn.Linear(20, 3)).double()
    linear = torch.nn.Linear(5, 3).double()
    for module, X in ((embed, tokens), (linear, tokens.double())):
        p = Problem.from_module(module, tokens, labels, loss="ce", device="cpu")
        assert p.X.dtype == (torch.long if module is embed else torch.float64)
        expected = torch.nn.functional.cross_entropy(module(X), labels)
        value, g = p.loss_and_grad(p.w0)
        assert value.item() == pytest.approx(expected.item(), rel=1e-12)
        torch.testing.assert_close(p.per_example_grads(p.w0).mean(0), g, rtol=1e-10, atol=1e-14)


def test_from_function_refuses_what_autograd_cannot_differentiate_in_one_line():
    """A vector value, a number, numpy on w, a constant, and an empty or non-finite w0 are refused when the
    Problem is made (they raised torch's RuntimeError or a TypeError from inside a run, or ran on NaN); a scalar
    torch function gives its closed-form gradient."""
    for fn, message in ((lambda w: w ** 2, r"fn: must return the loss as a scalar tensor .*got shape \(2,\)$"),
                        (lambda w: 1.0, r"fn: must return the loss as a scalar tensor .*got float$"),
                        (lambda w: (w.numpy() ** 2).sum(), r"fn: fails on w \(a tensor that requires grad\): "
                                                           r"Can't call numpy\(\)"),
                        (lambda w: torch.tensor(1.0), r"fn: its value does not depend on w")):
        with pytest.raises(ValueError, match="^" + message):
            Problem.from_function(fn, [1.0, 2.0], device="cpu")
    for w0 in ([], [math.nan, 1.0]):
        with pytest.raises(ValueError, match=r"^w0: needs at least one value, all finite"):
            Problem.from_function(lambda w: (w ** 2).sum(), w0, device="cpu")
    p = Problem.from_function(lambda w: (w ** 3).sum(), [1.0, 2.0], device="cpu")
    torch.testing.assert_close(p.grad(p.w0), torch.tensor([3.0, 12.0], dtype=torch.float64), rtol=0, atol=1e-15)


def test_from_module_leaves_the_callers_module_unchanged():
    """The Problem converts its own copy to float64: the caller's float32 module still runs on float32 input,
    with the same weights."""
    module = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    before = [p.detach().clone() for p in module.parameters()]
    X = torch.randn(20, 8)
    Problem.from_module(module, X, torch.randn(20, 1), loss="mse", dtype="float64", device="cpu")
    assert all(p.dtype == torch.float32 for p in module.parameters())
    assert module(X).dtype == torch.float32
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters()))


def test_init_scale_multiplies_the_default_initialization_and_does_not_apply_with_init():
    spec = {"model": "mlp", "widths": [5], "dataset": "digits", "classes": [0, 1], "n_train": 10}
    w1 = build_problem(spec, device="cpu").w0
    w02 = build_problem({**spec, "init_scale": 0.2}, device="cpu").w0
    torch.testing.assert_close(w02, 0.2 * w1, rtol=0, atol=0)
    with pytest.raises(flowsim.ScenarioError, match=r"^problem.init_scale: does not apply with init"):
        flowsim.load_scenario({"problem": {**spec, "init_scale": 0.2, "init": [0.0] * w1.numel()}, "steps": 1,
                               "runs": {"a": {"lr": 0.1}}})


def test_from_module_refuses_a_random_output_in_one_line_and_accepts_batchnorm_in_training_mode():
    """Dropout in training mode makes two calls at the same weights differ: every product and flow would read the
    masks as curvature, so it is refused in one line naming the fix; in eval mode the loss is the network's
    without dropout. BatchNorm in training mode (which cannot run on one example) is a function of the weights
    and the batch: the full-batch loss is torch's on all examples, the same at every call, its gradient by
    torch.func equals the reverse-mode one (the running statistics it would update in place are not tracked), and
    per-example gradients are refused in one line."""
    gen = torch.Generator().manual_seed(0)
    X, Y = torch.randn(64, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (64,), generator=gen)
    dropout = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.ReLU(), torch.nn.Dropout(0.3),
                                  torch.nn.Linear(16, 3)).double()
    with pytest.raises(ValueError, match=r"^module: .*dropout.*module\.eval\(\)") as refused:
        Problem.from_module(dropout, X, Y, loss="ce", device="cpu")
    assert "\n" not in str(refused.value)
    p = Problem.from_module(dropout.eval(), X, Y, loss="ce", device="cpu")
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(dropout(X), Y).item()
    assert p.loss(p.w0).item() == pytest.approx(expected, rel=1e-12)

    batchnorm = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                                    torch.nn.Linear(16, 3)).double()
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(copy.deepcopy(batchnorm)(X), Y).item()
    p = Problem.from_module(batchnorm, X, Y, loss="ce", device="cpu")
    assert p.loss(p.w0).item() == pytest.approx(expected, rel=1e-12)
    assert p.loss(p.w0).item() == p.loss(p.w0).item()
    # a pure function of w (no running statistics updated in place), so torch.func transforms it, as the rod
    # flow does; and per-example quantities, undefined under batch statistics, are refused in one line
    torch.testing.assert_close(torch.func.grad(p.loss)(p.w0), p.grad(p.w0), rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match=r"^per-example losses and gradients are not defined .*module\.eval\(\)"):
        p.per_example_grads(p.w0)


def test_from_module_takes_a_dataset_or_dataloader_of_pairs_as_its_data():
    """A torch Dataset (its items numpy inputs and int labels) or a shuffling DataLoader over it gives the Problem
    of X and Y themselves, every example in the dataset's order, and the same loss (it was a TypeError: missing
    Y). Items that are not pairs, or X without Y, are one-line errors."""
    from torch.utils.data import DataLoader, Dataset, TensorDataset
    gen = torch.Generator().manual_seed(0)
    X, labels = torch.randn(30, 5, generator=gen), torch.randint(0, 3, (30,), generator=gen)
    module = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))

    class Pairs(Dataset):
        def __len__(self):
            return len(X)

        def __getitem__(self, i):
            return X[i].numpy(), int(labels[i])

    reference = Problem.from_module(module, X, labels, loss="ce", device="cpu")
    for data in (Pairs(), DataLoader(Pairs(), batch_size=7, shuffle=True), TensorDataset(X, labels)):
        p = Problem.from_module(module, data, loss="ce", device="cpu")
        assert torch.equal(p.X, reference.X) and torch.equal(p.Y, reference.Y)
        assert p.loss(p.w0).item() == reference.loss(reference.w0).item()
    with pytest.raises(ValueError, match=r"^X: a TensorDataset whose examples are not \(input, target\) pairs, or "
                                         r"none$"):
        Problem.from_module(module, TensorDataset(X), loss="ce")
    with pytest.raises(ValueError, match=r"^Y: required \(the targets\), unless X is a torch Dataset or DataLoader"):
        Problem.from_module(module, X, loss="ce")


def test_a_torch_transformer_layer_has_hessian_vector_products_and_its_curvature_runs():
    """nn.TransformerEncoderLayer calls scaled_dot_product_attention, whose fused CPU kernel has no second
    derivative: every Hessian-vector product, curvature record and flow failed ("derivative for
    aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented"). The product equals a central
    difference of gradients, and a recorded sharpness equals the top eigenvalue of the dense Hessian."""
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Embedding(6, 8),
                                 torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True),
                                 torch.nn.Flatten(), torch.nn.Linear(32, 6))
    X = torch.randint(0, 6, (24, 4), generator=torch.Generator().manual_seed(1))
    p = Problem.from_module(module, X, X.max(1).values, loss="ce", device="cpu")
    v = torch.randn(p.n_params, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    eps = 1e-5
    difference = (p.loss_and_grad(p.w0 + eps * v)[1] - p.loss_and_grad(p.w0 - eps * v)[1]) / (2 * eps)
    torch.testing.assert_close(p.hvp(p.w0, v), difference, rtol=1e-6, atol=1e-8)
    ds = flowsim.simulate(p, "gd", "discrete", 0.1, 1, record={"curvature_every": 1, "eig_tol": 1e-8})
    # the dense Hessian by central differences of gradients, column by column (torch.func.hessian is not
    # symmetric on this module, to 0.08: vmap over its second derivatives errs)
    columns = [(p.loss_and_grad(p.w0 + eps * e)[1] - p.loss_and_grad(p.w0 - eps * e)[1]) / (2 * eps)
               for e in torch.eye(p.n_params, dtype=torch.float64)]
    dense = torch.stack(columns)
    top = torch.linalg.eigvalsh((dense + dense.T) / 2)[-1].item()
    assert ds.sharpness.values[0, 0] == pytest.approx(top, rel=1e-6)
