"""Small files flowsim ships (``flowsim.data``), read-only.

- ``moons.npz``: the tour's dataset in the user format of ``problem.dataset.path`` — X (256, 2) float64 inputs,
  Y (256,) int64 labels 0/1 — made by ``sklearn.datasets.make_moons(256, noise=0.2, random_state=0)``.
"""
from pathlib import Path


def path(name: str) -> Path:
    """The path of the shipped file ``name`` (e.g. ``"moons.npz"``)."""
    found = Path(__file__).with_name(name)
    if not found.is_file():
        raise FileNotFoundError(f"flowsim.data: no file {name!r} (shipped: moons.npz)")
    return found
