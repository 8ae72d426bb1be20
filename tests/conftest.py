import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic_threads():
    """Tests run on CPU with the default thread count; nothing else global is changed."""
    yield


@pytest.fixture
def tiny_mlp_problem():
    """A small float64 MLP on 60 digits (4 classes) — small enough for dense Hessians."""
    from flowsim.models import build_problem
    return build_problem({"model": "mlp", "widths": [6, 5], "activation": "tanh", "dataset": "digits",
                          "classes": [0, 1, 2, 3], "n_train": 60, "loss": "mse"}, dtype="float64", device="cpu")
