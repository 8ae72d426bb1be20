"""Vision models (CNN, GroupNorm ResNet, ViT) and MNIST-1D: exact derivatives, layers against torch, data."""
import numpy as np
import pytest
import torch

import flowsim
from flowsim.scenario import bundled as bundled_scenarios
from flowsim.models import build_problem
from flowsim.models.layers import GroupNorm, pool
from flowsim.models.mnist1d import mnist1d
from flowsim.models.problem import Problem

from derivative_checks import dense_hessian_error, hvp_fd_error, third_derivative_fd_error

SMALL = {
    "cnn-avg-digits": {"model": "cnn", "widths": [3, 4], "dataset": "digits", "classes": [0, 1, 2], "n_train": 24},
    "cnn-max-mnist1d": {"model": "cnn", "widths": [3, 4], "pool": "max", "dataset": "mnist1d", "n_train": 24},
    "resnet-digits": {"model": "resnet", "widths": [4, 8], "groups": 2, "dataset": "digits", "classes": [0, 1, 2],
                      "n_train": 24},
    "resnet-mnist1d": {"model": "resnet", "widths": [2, 4], "groups": 2, "dataset": "mnist1d", "n_train": 12},
    "vit-digits": {"model": "vit", "patch": 2, "d_model": 8, "n_heads": 2, "n_layers": 1, "dataset": "digits",
                   "classes": [0, 1, 2], "n_train": 24},
    "vit-mnist1d-ce": {"model": "vit", "patch": 8, "d_model": 4, "n_heads": 2, "n_layers": 1, "mlp_width": 8,
                       "dataset": "mnist1d", "n_train": 12, "loss": "ce"},
}
SMALLEST = ["cnn-avg-digits", "resnet-mnist1d", "vit-mnist1d-ce"]  # dense Hessians: 193, 206, 310 parameters


def small(name):
    return build_problem({**SMALL[name], "dataset": {"name": SMALL[name]["dataset"], "size": 200}},
                         dtype="float64", device="cpu")


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


@pytest.mark.parametrize("name", SMALLEST)
def test_hvp_equals_dense_hessian_times_v(name):
    p = small(name)
    assert p.n_params <= 320
    product_error, asymmetry = dense_hessian_error(p)
    assert product_error < 1e-10 and asymmetry < 1e-10


def test_groupnorm_is_torch_group_norm_with_exact_third_derivatives():
    torch.manual_seed(0)
    x = torch.randn(5, 6, 7, 3, dtype=torch.float64)
    gn = GroupNorm(3, 6).double()
    with torch.no_grad():
        gn.weight.normal_(), gn.bias.normal_()
    torch.testing.assert_close(gn(x), torch.nn.functional.group_norm(x, 3, gn.weight, gn.bias, 1e-5),
                               rtol=0, atol=1e-12)
    module = torch.nn.Sequential(torch.nn.Conv1d(2, 4, 3, padding=1), GroupNorm(2, 4), torch.nn.Flatten(),
                                 torch.nn.Linear(28, 3))
    p = Problem.from_module(module, torch.randn(10, 2, 7), torch.randn(10, 3), dtype="float64", device="cpu")
    assert third_derivative_fd_error(p, seed=3) < 1e-6


@pytest.mark.parametrize("kind, reference", [("avg", torch.nn.functional.avg_pool2d),
                                             ("max", torch.nn.functional.max_pool2d)])
def test_pooling_is_torch_pooling_with_floor_cropping(kind, reference):
    x = torch.randn(2, 3, 7, 5, dtype=torch.float64)
    torch.testing.assert_close(pool(x, kind), reference(x, 2), rtol=0, atol=1e-14)
    one_d = {"avg": torch.nn.functional.avg_pool1d, "max": torch.nn.functional.max_pool1d}[kind]
    torch.testing.assert_close(pool(x[:, :, 0], kind), one_d(x[:, :, 0], 2), rtol=0, atol=1e-14)


def test_digits_reach_the_cnn_as_standardized_8x8_images():
    from sklearn.datasets import load_digits
    images = load_digits().images[:50]
    std = images.std(0)
    expected = (images - images.mean(0)) / np.where(std > 0, std, 1.0)
    p = build_problem({"model": "cnn", "dataset": "digits", "n_train": 50}, device="cpu")
    assert p.X.shape == (50, 1, 8, 8)
    np.testing.assert_allclose(p.X[:, 0].numpy(), expected, rtol=0, atol=1e-12)


def test_mnist1d_matches_the_reference_implementation():
    """Values of the reference ``mnist1d`` package's make_dataset(num_samples=500, seed=42) (x then x_test)."""
    X, Y, n_classes = mnist1d(500, 42)
    assert X.shape == (500, 40) and n_classes == 10
    np.testing.assert_array_equal(Y[:12], [4, 9, 3, 2, 9, 1, 7, 7, 6, 6, 6, 4])
    np.testing.assert_allclose(X[0, :4], [1.3985160747, 1.7330041087, 1.7836403489, 0.3649234199], rtol=0, atol=1e-8)
    np.testing.assert_allclose(X[499, -3:], [-0.5963451779, -0.6384143766, -0.7556203181], rtol=0, atol=1e-8)


def test_mnist1d_is_seeded_balanced_and_standardized():
    X, Y, _ = mnist1d(300, 0)
    X2, Y2, _ = mnist1d(300, 0)
    X3, _, _ = mnist1d(300, 1)
    np.testing.assert_array_equal(X, X2)
    np.testing.assert_array_equal(Y, Y2)
    assert np.abs(X - X3).mean() > 0.1
    np.testing.assert_array_equal(np.bincount(Y), [30] * 10)
    assert abs(X.mean()) < 1e-12 and abs(X.std() - 1) < 1e-12


def test_bad_image_settings_name_their_key():
    with pytest.raises(ValueError, match=r"^problem\.image_shape"):
        build_problem({"model": "cnn", "dataset": "digits", "image_shape": [1, 4, 4]}, device="cpu")
    with pytest.raises(ValueError, match=r"^problem\.image_shape"):
        build_problem({"model": "cnn", "dataset": {"name": "gaussian_mixture", "dim": 10}}, device="cpu")
    with pytest.raises(ValueError, match=r"^problem\.patch"):
        build_problem({"model": "vit", "dataset": "digits", "patch": 3}, device="cpu")
    with pytest.raises(flowsim.ScenarioError, match=r"^problem\.groups"):
        flowsim.load_scenario({"problem": {"model": "resnet", "widths": [4, 6], "groups": 4}, "steps": 1,
                               "runs": {"gd": {"lr": 0.1}}})


def test_image_layouts_that_inference_would_misread_are_refused_and_once_given_match_the_bundled_images(tmp_path):
    """A user's images of shape (n, 8, 8) were read as 8 channels of a 1-D signal, and (n, 8, 8, 1) channels-last
    as 8 channels of 8 × 1 images, silently. Each is a one-line error now; with image_shape [1, 8, 8], and
    transposed to (n, 1, 8, 8), the CNN's loss is the bundled digits' (read as (1, 8, 8))."""
    spec = {"model": "cnn", "widths": [4], "loss": "ce", "n_train": 100}
    bundled = build_problem({**spec, "dataset": "digits"}, device="cpu")
    X, Y = bundled.X.numpy().reshape(-1, 8, 8), bundled.Y.numpy()
    files = {"gray": X, "last": X[..., None], "first": X[:, None]}
    for name, images in files.items():
        np.savez(tmp_path / f"{name}.npz", X=images, Y=Y)
    user = {name: {**spec, "dataset": {"path": str(tmp_path / f"{name}.npz")}} for name in files}
    with pytest.raises(ValueError, match=r"^problem\.image_shape: inputs of shape \[8, 8\] are a one-channel image "
                                         r"or a signal of 8 channels; give image_shape: \[1, 8, 8\] or \[8, 8\]$"):
        build_problem(user["gray"], device="cpu")
    with pytest.raises(ValueError, match=r"^problem\.image_shape: inputs of shape \[8, 8, 1\] look channels-last "
                                         r"\(H, W, C\): save X.transpose\(0, 3, 1, 2\)"):
        build_problem(user["last"], device="cpu")
    expected = bundled.loss(bundled.w0).item()
    for problem in (build_problem({**user["gray"], "image_shape": [1, 8, 8]}, device="cpu"),
                    build_problem(user["first"], device="cpu")):
        assert problem.loss(problem.w0).item() == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("name", sorted(n for n in bundled_scenarios() if n.split("-")[0] in ("cnn", "resnet", "vit")))
def test_bundled_vision_scenario_runs_at_test_scale(name):
    ds = flowsim.run(bundled_scenarios()[name], steps=2, progress=False)
    assert ds.sizes["step"] == 3
    assert np.isfinite(ds["loss"].values).all() and not ds["diverged"].values.any()
