"""Causal transformer, LSTM and token tasks: exact derivatives, LayerNorm against torch, causality, data, losses."""
import numpy as np
import pytest
import torch

import flowsim
from flowsim.scenario import bundled as bundled_scenarios
from flowsim.models import build_problem
from flowsim.models.layers import LayerNorm
from flowsim.models.sequence import LSTMConfig, TransformerConfig
from flowsim.models.tasks import markov, markov_chain, sorting
from flowsim.models.problem import Problem

from derivative_checks import dense_hessian_error, hvp_fd_error, third_derivative_fd_error

SMALL = {
    "sorting-ce": {"model": "transformer", "d_model": 4, "n_heads": 2, "n_layers": 1, "mlp_width": 8,
                   "dataset": {"name": "sorting", "vocab": 3, "length": 3, "size": 50}, "n_train": 16},
    "markov-mse": {"model": "transformer", "d_model": 8, "n_heads": 2, "n_layers": 2, "loss": "mse",
                   "dataset": {"name": "markov", "vocab": 4, "length": 6, "size": 50}, "n_train": 16},
    "lstm-sorting-ce": {"model": "lstm", "hidden": 3, "dataset": {"name": "sorting", "vocab": 3, "length": 3, "size": 50},
                        "n_train": 16},
    "lstm-markov-mse": {"model": "lstm", "hidden": 8, "loss": "mse",
                        "dataset": {"name": "markov", "vocab": 4, "length": 6, "size": 50}, "n_train": 16},
}


def small(name):
    return build_problem(SMALL[name], dtype="float64", device="cpu")


@pytest.mark.parametrize("name", SMALL)
def test_hvp_matches_finite_differences_of_the_gradient(name):
    assert hvp_fd_error(small(name)) < 1e-7


@pytest.mark.parametrize("name", SMALL)
def test_third_derivative_matches_finite_differences_of_hvps(name):
    assert third_derivative_fd_error(small(name)) < 1e-6


@pytest.mark.parametrize("name", SMALL)
def test_per_example_gradients_under_vmap_average_to_the_gradient(name):
    p = small(name)
    torch.testing.assert_close(p.per_example_grads(p.w0).mean(0), p.grad(p.w0), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name, n_params", [("sorting-ce", 235), ("lstm-sorting-ce", 108)])
def test_hvp_equals_dense_hessian_times_v_on_the_smallest_models(name, n_params):
    p = small(name)
    assert p.n_params == n_params
    product_error, asymmetry = dense_hessian_error(p)
    assert product_error < 1e-10 and asymmetry < 1e-10


def test_layernorm_is_torch_layer_norm_with_exact_third_derivatives():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 6, dtype=torch.float64)
    ln = LayerNorm(6).double()
    with torch.no_grad():
        ln.weight.normal_(), ln.bias.normal_()
    torch.testing.assert_close(ln(x), torch.nn.functional.layer_norm(x, (6,), ln.weight, ln.bias, 1e-5),
                               rtol=0, atol=1e-12)
    module = torch.nn.Sequential(torch.nn.Linear(6, 5), LayerNorm(5), torch.nn.Linear(5, 3))
    p = Problem.from_module(module, torch.randn(10, 6), torch.randn(10, 3), dtype="float64", device="cpu")
    assert third_derivative_fd_error(p, seed=3) < 1e-6


def test_cross_entropy_is_averaged_over_examples_and_target_positions():
    p = small("sorting-ce")
    logits = p.outputs(p.w0)
    assert logits.shape == (16, 3, 3)  # examples × target positions × symbols
    logp = torch.log_softmax(logits, -1).numpy()
    Y = p.Y.numpy()
    by_hand = -np.mean([logp[i, t, Y[i, t]] for i in range(16) for t in range(3)])
    assert abs(p.loss(p.w0).item() - by_hand) < 1e-12
    torch.testing.assert_close(p.per_example_losses(p.w0).mean(), p.loss(p.w0), rtol=0, atol=1e-12)


def test_mse_is_half_squared_error_summed_over_positions_and_symbols():
    p = small("markov-mse")
    out = p.outputs(p.w0).numpy()
    assert p.Y.shape == out.shape == (16, 6, 4)
    by_hand = 0.5 * ((out - p.Y.numpy()) ** 2).sum((1, 2)).mean()
    assert abs(p.loss(p.w0).item() - by_hand) < 1e-12


@pytest.mark.parametrize("name, config", [("markov-mse", TransformerConfig), ("lstm-markov-mse", LSTMConfig)])
def test_sequence_models_are_causal_and_read_float_token_ids(name, config):
    p = build_problem({**SMALL[name], "loss": "ce"}, dtype="float64", device="cpu")
    X = p.X.clone()
    base = p.outputs(p.w0, X)
    X[:, 3] = (X[:, 3] + 1) % 4
    changed = p.outputs(p.w0, X)
    # input length 6 = target positions: outputs at positions 0..2 cannot see token 3
    torch.testing.assert_close(changed[:, :3], base[:, :3], rtol=0, atol=0)
    assert (changed[:, 3:] - base[:, 3:]).abs().amax() > 1e-3
    module = config.model_validate(SMALL[name]).make_module((6,), 4)
    torch.testing.assert_close(module(X.float()), module(X.long()), rtol=0, atol=0)


def test_sorting_task_layout_and_seeds():
    X, Y, V = sorting(200, 5, 4, seed=0)
    assert X.shape == (200, 8) and Y.shape == (200, 4) and V == 5
    np.testing.assert_array_equal(Y, np.sort(X[:, :4], axis=1))
    np.testing.assert_array_equal(X[:, 4], 5)            # separator token V
    np.testing.assert_array_equal(X[:, 5:], Y[:, :-1])   # teacher forcing
    np.testing.assert_array_equal(X, sorting(200, 5, 4, seed=0)[0])
    assert (X[:, :4] != sorting(200, 5, 4, seed=1)[0][:, :4]).mean() > 0.5


def test_markov_task_follows_its_transition_matrix():
    X, Y, V = markov(4000, 4, 8, seed=0)
    np.testing.assert_array_equal(X[:, 1:], Y[:, :-1])
    P = markov_chain(4, seed=0)
    counts = np.zeros((4, 4))
    np.add.at(counts, (X.astype(int).ravel(), Y.ravel()), 1)
    freq = counts / counts.sum(1, keepdims=True)
    se = np.sqrt(P * (1 - P) / counts.sum(1, keepdims=True))   # binomial standard errors
    assert np.all(np.abs(freq - P) < 5 * se + 1e-12)
    np.testing.assert_array_equal(Y, markov(4000, 4, 8, seed=0)[1])
    assert not np.array_equal(Y, markov(4000, 4, 8, seed=1)[1])


@pytest.mark.parametrize("model", ["transformer", "lstm"])
def test_sequence_models_need_a_token_task(model):
    with pytest.raises(flowsim.ScenarioError, match=rf"^problem\.dataset: the {model} needs a token task"):
        flowsim.load_scenario({"problem": {"model": model, "dataset": "digits"}, "steps": 1,
                               "runs": {"gd": {"lr": 0.1}}})
    with pytest.raises(ValueError, match=r"^problem\.classes"):
        build_problem({"model": model, "classes": [0, 1]}, device="cpu")


@pytest.mark.parametrize("name", sorted(n for n in bundled_scenarios() if n.split("-")[0] in ("transformer", "lstm")))
def test_bundled_sequence_scenario_runs_at_test_scale(name):
    ds = flowsim.run(bundled_scenarios()[name], steps=2, progress=False)
    assert ds.sizes["step"] == 3
    assert np.isfinite(ds["loss"].values).all() and not ds["diverged"].values.any()
