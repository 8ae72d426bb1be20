"""The rod flow (solvers/rod.py) against its derivation: the linear growth rate of the half-length δ on quadratics,
the self-stabilized orbit of a quartic model, and a rule defined here that gets a rod flow without rod code."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest
import torch

import flowsim
from flowsim.solvers import Rod
from flowsim.solvers.rules import Rule


def quadratic(curvatures, w0) -> flowsim.Problem:
    lam = torch.tensor(curvatures, dtype=torch.float64)
    return flowsim.Problem.from_function(lambda w: 0.5 * (lam * w * w).sum(), w0)


@pytest.mark.parametrize("sharpness", [1.9, 1.99, 2.01, 2.2])
def test_half_length_grows_exactly_above_the_edge_at_the_derived_rate(sharpness):
    """On L = ½λw² the rod flow is linear: dδ/dt = (ηλ − 2)δ, dc/dt = −ηλc, from the rod through w0, w1, w2,
    δ(0) = ¼(ηλ)²w0. So ‖δ‖² = δ(0)² e^{2(ηλ − 2)t}: it grows exactly when ηλ > 2. One RK4 substep per unit of
    time errs by r⁵/120 per step relative (r = ηλ − 2), so ‖δ‖² by 2k·r⁵/120 after k steps: the tolerance is 1.5×
    that (with 1e-12 for rounding)."""
    eta, steps = 1.0, 20
    ds = flowsim.simulate(quadratic([sharpness], [1.0]), "gd", "rod", step_size=eta, steps=steps,
                          record={"keep_weights": 1}).isel(run=0)
    amplitude_sq = ds["sigma_eigs"].isel(crit=0).values
    k, r = np.arange(steps), eta * sharpness - 2
    expected = (0.25 * (eta * sharpness) ** 2) ** 2 * np.exp(2 * r * k)
    np.testing.assert_allclose(amplitude_sq[:steps], expected, rtol=1.5 * 2 * steps * abs(r) ** 5 / 120 + 1e-12)
    assert (amplitude_sq[steps - 1] > amplitude_sq[0]) == (eta * sharpness > 2)
    c = ds["w"].isel(param=0).values[1:steps]  # the rod's centre (step 0 records w0, where the rod is built)
    predicted = 0.5 * sharpness * (c ** 2 + amplitude_sq[1:steps])  # ½[L(c + δ) + L(c − δ)] = ½λ(c² + δ²)
    np.testing.assert_allclose(ds["predicted_loss"].values[1:steps], predicted, rtol=1e-12)


def test_each_eigendirection_has_its_own_rate():
    """Two curvatures on either side of the edge: δ grows along one and dies along the other, each at ηλᵢ − 2
    (read off the rod's state through its process). Four RK4 substeps err by 4(r/4)⁵/120 ≤ 1.1e-5 per unit of
    time on these rates."""
    problem = quadratic([2.3, 1.2], [1.0, 1.0])
    rod = Rod(problem, flowsim.solvers.make_rule("gd"), options=Rod.Options(substeps=4))
    traj = rod.start(problem.w0)
    deltas = []
    for _ in range(30):
        rod.step(traj, 1.0, measure=False)
        deltas.append(rod._delta.clone())
    rates = np.log(deltas[-1].numpy() / deltas[-2].numpy())
    np.testing.assert_allclose(rates, [2.3 - 2, 1.2 - 2], rtol=1e-4)


# L(x, y) = a·x + ½(b + x)y² + (q/4)y⁴: sharpening along x (a < 0) until the oscillation along y, whose
# y²/2 in ∂L/∂x pushes x back, stabilizes it. GD's period-two orbit y ↦ −y: y*² = −2a, η(b + x* + q y*²) = 2.
A, B, Q, ETA = -0.01, 1.9, -2.0, 1.0


def quartic() -> flowsim.Problem:
    return flowsim.Problem.from_function(
        lambda w: A * w[0] + 0.5 * (B + w[0]) * w[1] ** 2 + 0.25 * Q * w[1] ** 4, [0.0, 0.1])


def test_quartic_self_stabilization_matches_the_discrete_orbit():
    """Every period-two orbit of the map is a fixed point of the rod flow (docs/rod.md), so the rod settles at
    GD's own orbit: ‖δ‖² = y*² = −2a, and the sharpness at the centre b + x* = 2/η − q y*² = 2.04, not the
    central flow's 2/η. Both runs are converged to 1e-12 by step 1000 (measured: 3e-8 at step 600, < 1e-13 at
    1000 and 1500), so the tolerance is 1e-9."""
    steps = 1000
    gd = flowsim.simulate(quartic(), "gd", "discrete", step_size=ETA, steps=steps, record={"keep_weights": 1})
    rod = flowsim.simulate(quartic(), "gd", "rod", step_size=ETA, steps=steps, record={"keep_weights": 1})
    gd, rod = gd.isel(run=0), rod.isel(run=0)
    w = gd["w"].dropna("step").values
    orbit_centre, orbit_half = 0.5 * (w[-2] + w[-3]), 0.5 * (w[-2] - w[-3])
    y_sq = -2 * A
    centre_sharpness = 2 / ETA - Q * y_sq
    assert np.isclose(orbit_half @ orbit_half, y_sq, rtol=1e-9)
    assert np.isclose(B + orbit_centre[0], centre_sharpness, rtol=1e-9)
    c = rod["w"].dropna("step").values[-1]
    assert np.isclose(float(rod["sigma_eigs"].isel(crit=0).dropna("step")[-1]), y_sq, rtol=1e-9)
    assert np.isclose(B + c[0], centre_sharpness, rtol=1e-9) and abs(c[1]) < 1e-9
    assert abs(centre_sharpness - 2 / ETA) > 0.03  # the quartic term moves the edge, and the rod sees it


@dataclass(frozen=True)
class Nesterov(Rule):
    """Nesterov momentum, defined here only: m ← βm + g, w ← w − η(g + βm). Threshold on a quadratic:
    ηλ < 2(1 + β)/(1 + 2β)."""
    name: ClassVar[str] = "nesterov-test"
    edge_fraction: ClassVar[float] = 0.5
    beta1: float = 0.5

    def init(self, w, g0):
        return {"m": torch.zeros_like(w)}

    def advance_state(self, g, state):
        return {"m": self.beta1 * state["m"] + g}

    def direction(self, g, state):
        return g + self.beta1 * state["m"]

    def direction_gain(self, state):
        return 1.0 / (1.0 - self.beta1)

    def threshold_coefficient(self):
        return 2 * (1 + self.beta1) / (1 + 2 * self.beta1)


@pytest.mark.parametrize("over_threshold", [0.95, 1.05])
def test_a_rule_defined_elsewhere_gets_a_rod_flow(over_threshold):
    """The rod flow of a rule it has never seen: on a quadratic its δ grows exactly when ηλ passes the rule's own
    threshold. Linearized (docs/rod.md), δ over (w, the momentum the step uses) follows dδ/dt = −(A + I)δ, A the
    Jacobian of the step z ↦ z' (here w' = (1 − ηλ)w − ηβm, m' = βm + λw'): δ grows at −(μ + 1) where the map's
    eigenvalue μ passes −1, Nesterov's threshold 2(1 + β)/(1 + 2β). One RK4 substep errs by < 1e-6 on that rate."""
    rule, eta = Nesterov(), 1.0
    lam = over_threshold * rule.threshold_coefficient() / eta
    rod = Rod(quadratic([lam], [1.0]), rule)
    traj = rod.start(torch.ones(1, dtype=torch.float64))
    sizes = []
    for _ in range(60):
        rod.step(traj, eta, measure=False)
        sizes.append(rod._delta.norm().item())
    assert (sizes[-1] > sizes[-2] > 0) == (over_threshold > 1)
    beta, shrink = rule.beta1, 1 - eta * lam
    A = np.array([[shrink, -eta * beta], [lam * shrink, beta * shrink]])
    assert math.isclose(math.log(sizes[-1] / sizes[-2]), max(np.linalg.eigvals(-(A + np.eye(2))).real), rel_tol=1e-3)


def test_a_rule_without_a_rod_flow_is_refused_with_its_reason():
    @dataclass(frozen=True)
    class Clipped(Rule):
        name: ClassVar[str] = "clipped-test"
        rod_flow: ClassVar[str] = "its step is not smooth in the gradient"
        edge_fraction: ClassVar[float] = 0.5

        def threshold_coefficient(self):
            return 2.0

    with pytest.raises(ValueError, match="^rule: its step is not smooth in the gradient$"):
        Rod(quadratic([1.0], [1.0]), Clipped())


@pytest.mark.parametrize("name, momenta, second_moments", [
    ("gd", set(), set()), ("momentum", {"m"}, set()), ("rmsprop", set(), {"nu"}),
    ("scalar_rmsprop", set(), {"nu"}), ("adam", {"m"}, {"v"})])
def test_which_state_oscillates_with_w(name, momenta, second_moments):
    """The rod gives a half-length to w and to the state whose update is odd in g (a momentum), and carries the
    second moments (even, quadratic in g) and Adam's clock t (neither) at its centre, as the rules define them."""
    rule, w = flowsim.solvers.make_rule(name), torch.zeros(3, dtype=torch.float64)
    assert rule.momenta(w) == momenta and rule.second_moments(w) == second_moments


def test_the_edge_controller_drives_the_rod_flow():
    """`step_size: edge` on the rod process: the controller reads the centre's state and sets η = c·θ/S, so on a
    quadratic of sharpness 4 its default c = 1.5 for GD gives η = 1.5·2/4 = 0.75 from the first re-estimate."""
    ds = flowsim.simulate(quadratic([4.0, 1.0], [1.0, 1.0]), "gd", "rod", step_size="edge", steps=5).isel(run=0)
    assert np.allclose(ds["step_size"].values[1:5], 0.75, rtol=1e-3)
