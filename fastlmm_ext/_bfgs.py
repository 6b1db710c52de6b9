"""Bounded (quasi-)Newton minimisation with an analytic gradient, stopping at the optimum.

Minimises f(θ) over {θ : θ ≥ lower} (lower = 0 or −∞ per component) by a projected Newton method:

* **Active set.** A component on its bound whose Newton step points outwards is held there; the
  step is d_F = −B_FF⁻¹ g_F on the free components F, with B the model of the Hessian.  Each
  trial point is projected onto the box, max(θ + α d, lower); a component that the step takes
  within ``ON_BOUND`` of its bound is put on it (a Newton step stops short of a boundary
  optimum by a fraction of the distance).
* **Hessian.** Given ``hess`` (the mixed models' average-information matrix, ``_hessian``), B is
  that matrix at every accepted point: Newton steps, about half the evaluations of the BFGS
  updates on the benchmarks' designs.  Once a unit step along it fails the line search's
  first test, the model is dropped for the rest of the fit and the BFGS updates below go on
  from its last matrix (near-singular vector terms, whose curved valleys it mispredicts).
* **Line search.** α = 1 (the quasi-Newton step; the first, before any curvature is known, is
  limited to ``FIRST_STEP`` in θ), Armijo's sufficient decrease, backtracking by quadratic
  interpolation of f alone: the gradient is asked for only at an accepted point, where the
  backend's factor of that θ serves it.
* **Curvature** without a Hessian model: B starts as the ``curvature`` diagonal scaled by the
  first step's secant (Nocedal & Wright 6.20) and gets Powell-damped BFGS updates, so it stays
  positive definite whatever the noise in g.
* **Stopping.**  ``"scaled gradient"``: the predicted decrease ½ g_Fᵀ B_FF⁻¹ g_F (half the square
  of lme4's scaled gradient |chol(H)⁻ᵀ g| with H ≈ B) is below ``ftol`` once B carries
  curvature (the Hessian model, or one BFGS update) — an absolute test on f, a log-likelihood, in any units of θ.
  ``"rounding"``: no trial point lowers f by more than f's rounding (``noise``: a few ulps of |f|)
  while the predicted decrease is itself within a few roundings — asking for less would chase
  the rounding of f.  ``"predicted decrease"``: two Newton steps in a row on the Hessian model,
  the second's predicted decrease ``dec`` a fraction r ≤ ``CONTRACTION`` of the first's, so that
  the next is about r·dec ≤ ``ftol``; the second step, taken whole and inside the box, lowered f
  by dec to within ``AGREEMENT``: its end is accepted without its gradient (one g, the dearer half
  of an evaluation, saved at the end of most fits).  ``"projected gradient zero"``: every free
  component's gradient is exactly 0.  ``"maxeval"``: the evaluation budget is spent.
* **Edges.** A scalar term's criterion is even in its θ, so its gradient vanishes on the bound
  even where moving inwards lowers f.  After stopping, each component on its bound is probed at
  lower + ``EDGE_PROBE``; a lower f there restarts the method from the probe (lme4's
  ``restart_edge``).
* **Rows.** Where a vector term has an effect of nearly no variance (a diagonal of T below
  ``NEAR_SINGULAR`` times its largest row norm), f hardly depends on the directions of T's rows
  (the correlations with that effect), and its minimum may lie at the end of a nearly flat
  valley, at a correlation of ±1 (T_ii = 0), where the gradient test stops too early (seen: 4e-4
  above BOBYQA's optimum).  After stopping, each later row of such a term is also probed at its
  end: T_ii = 0 with the row's norm (the effect's variance) kept; a lower f restarts from there.

Every θ is evaluated at most once (:class:`Evaluations` caches f and g by θ's bytes).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

__all__ = ["Evaluations", "BFGSResult", "minimize_bfgs", "STOP_REASONS"]

ARMIJO = 1e-4          # sufficient decrease: f(θ + s) ≤ f(θ) + ARMIJO gᵀs
FIRST_STEP = 0.5       # largest change of one θ component in the first step (θ is O(1): a relative scale)
MAX_BACKTRACKS = 12
EDGE_PROBE = 1e-3      # the inward probe of a component on its bound, as before (lme4's restart_edge)
MAX_RESTARTS = 3
NOISE_ULPS = 64        # f's rounding: NOISE_ULPS · eps · |f|
KEEP = 0.2             # fraction to the boundary: one step keeps ≥ KEEP of a component's distance to its bound
NEAR_BOUND = 0.01      # ... unless the component is this close to it: then the step may put it on the bound
ON_BOUND = 1e-4        # a step towards a bound ending this close to it is put on it (lme4's singularity tolerance)
NEAR_SINGULAR = 0.05   # a vector term's diagonal below this times its largest row norm: probe its rows' ends
CONTRACTION = 0.01     # "predicted decrease": the Newton steps' predicted decreases shrink at least this fast
AGREEMENT = 0.1        # ... and the last step's decrease of f is its prediction to within this fraction

#: Why :func:`minimize_bfgs` stopped (``OptSummary.stop_reason``).
STOP_REASONS = ("scaled gradient", "rounding", "predicted decrease", "projected gradient zero", "maxeval",
                "no parameters")


class Evaluations:
    """f and g of θ, each evaluated at most once per θ (cached by the bytes of θ).

    ``fg`` asks for f first, then g at the same θ, so the backend refactorizes once and its
    gradient reuses the factor.  ``nf``/``ng`` count the distinct θ at which f/g were evaluated."""

    def __init__(self, f: Callable[[np.ndarray], float], grad: Callable[[np.ndarray], np.ndarray]):
        self._f, self._g = f, grad
        self._fc: dict[bytes, float] = {}
        self._gc: dict[bytes, np.ndarray] = {}
        self.f_initial = np.nan

    @property
    def nf(self) -> int:
        return len(self._fc)

    @property
    def ng(self) -> int:
        return len(self._gc)

    def f(self, x: np.ndarray) -> float:
        key = x.tobytes()
        v = self._fc.get(key)
        if v is None:
            v = float(self._f(x.copy()))
            if not self._fc:
                self.f_initial = v
            self._fc[key] = v
        return v

    def fg(self, x: np.ndarray) -> tuple[float, np.ndarray]:
        v = self.f(x)
        key = x.tobytes()
        g = self._gc.get(key)
        if g is None:
            g = np.array(self._g(x.copy()), dtype=float)
            self._gc[key] = g
        return v, g


@dataclass
class BFGSResult:
    x: np.ndarray
    fun: float
    stop_reason: str
    converged: bool
    restarts: int          # restarts from a probe, of either kind
    iterations: int
    row_restarts: int = 0  # of them, from the end of a row of T (the row probe)


def _noise(fx: float) -> float:
    return NOISE_ULPS * np.finfo(float).eps * max(abs(fx), 1.0)


def _free_step(B: np.ndarray, g: np.ndarray, at_bound: np.ndarray) -> tuple[np.ndarray, float]:
    """The quasi-Newton step with the components on their bound that it would push outwards held
    there (repeated until no held component remains), and its predicted decrease ½ g_Fᵀ B_FF⁻¹ g_F."""
    n = g.size
    held = at_bound & (g > 0)
    while True:
        free = ~held
        d = np.zeros(n)
        if not free.any():
            return d, 0.0
        BF = B[np.ix_(free, free)]
        try:
            c = np.linalg.cholesky(BF)
        except np.linalg.LinAlgError:      # pragma: no cover - damped BFGS keeps B positive definite
            c = np.diag(np.sqrt(np.maximum(np.diag(BF), 1e-12)))
        z = np.linalg.solve(c, -g[free])
        dF = np.linalg.solve(c.T, z)
        d[free] = dF
        out = free & at_bound & (d < 0)
        if not out.any():
            return d, 0.5 * float(z @ z)
        held |= out


def minimize_bfgs(ev: Evaluations, x0: np.ndarray, lower: np.ndarray, ftol: float = 1e-7,
                  maxeval: int = 10_000, curvature: np.ndarray | None = None,
                  mirrors: dict[int, np.ndarray] | None = None, rows: list | None = None,
                  hess: Callable[[np.ndarray, np.ndarray], np.ndarray | None] | None = None) -> BFGSResult:
    """Minimise over {θ ≥ lower} from x0 (projected onto the box); see the module docstring.

    ``curvature``: the relative sizes of the Hessian's diagonal, up to one common factor (B
    starts as that diagonal, the factor fitted by the first step's secant); default all equal.
    ``mirrors``: {j: indices S} where f is unchanged by changing the sign of θ_S while θ_j is
    on its bound; the edge probe of j then also tries the mirror image (θ_S → −θ_S).  ``rows``:
    per vector term, the θ indices of each row of its T, for the row probe
    (``_start.row_directions``)."""
    lower = np.asarray(lower, dtype=float)
    x = np.maximum(np.asarray(x0, dtype=float), lower)
    n = x.size
    bounded = np.isfinite(lower)
    fx, g = ev.fg(x)
    B = np.diag(np.ones(n) if curvature is None else np.asarray(curvature, dtype=float))
    scaled = False
    model = _HessianModel(hess)
    B, scaled = model.update(x, g, B, scaled)
    restarts = iterations = row_restarts = 0
    reason = ""
    while True:
        reason, x, fx, g, B, scaled, it = _descend(ev, x, fx, g, B, scaled, lower, bounded, ftol, maxeval, model)
        iterations += it
        if reason == "maxeval" or restarts >= MAX_RESTARTS:
            break
        probe = _edge_probe(ev, x, fx, lower, bounded, maxeval, mirrors or {})
        if probe is None:
            probe = _row_probe(ev, x, fx, maxeval, rows or [])
            row_restarts += probe is not None
        if probe is None:
            break
        restarts += 1
        x = probe
        fx, g = ev.fg(x)
        B, scaled = model.update(x, g, B, scaled)
    return BFGSResult(x, fx, reason, reason != "maxeval", restarts, iterations, row_restarts)


def _edge_probe(ev: Evaluations, x, fx, lower, bounded, maxeval, mirrors) -> np.ndarray | None:
    """The components on their bound moved inwards by EDGE_PROBE where that alone lowers f (the
    best probe, or the union of several), or None."""
    better, fbest = None, fx - max(1e-10, _noise(fx))
    for j in np.flatnonzero(bounded & (x <= lower)):
        probes = [x.copy()]
        S = mirrors.get(int(j))
        if S is not None and np.any(x[S] != 0):
            probes.append(x.copy())
            probes[1][S] = -x[S]
        for probe in probes:
            if ev.nf >= maxeval:
                return better
            probe[j] = lower[j] + EDGE_PROBE
            fp = ev.f(probe)
            if fp < fbest:
                if better is None or len(probes) > 1:
                    better, fbest = probe, fp
                else:
                    better = np.maximum(better, probe)
    return better


def _row_probe(ev: Evaluations, x, fx, maxeval, rows) -> np.ndarray | None:
    """The best of the rows' end points (module docstring) of the nearly singular vector terms
    where that lowers f, or None.  At an end the row keeps its norm and its direction among the
    earlier effects, and T_ii = 0 (its bound)."""
    better, fbest = None, fx - max(1e-10, _noise(fx))
    for term_rows in rows:
        largest = max(float(np.linalg.norm(x[r])) for r in term_rows)
        if min(x[r[-1]] for r in term_rows) > NEAR_SINGULAR * largest:
            continue
        for r in term_rows[1:]:
            d, off = r[-1], r[:-1]
            r_off = float(np.linalg.norm(x[off]))
            # (a diagonal within ON_BOUND of 0 is at the row's end already: the snap to the bound tries it)
            if x[d] < ON_BOUND or r_off == 0.0 or ev.nf >= maxeval:
                continue
            probe = x.copy()
            probe[off] *= float(np.hypot(x[d], r_off)) / r_off
            probe[d] = 0.0
            fp = ev.f(probe)
            if fp < fbest:
                better, fbest = probe, fp
    return better


class _HessianModel:
    """The Hessian model of the Newton steps, trusted until a unit step along it fails Armijo's
    test (then the damped BFGS updates take over from the last matrix, for the rest of the fit)."""

    def __init__(self, hess):
        self.hess = hess
        self.current = False      # the B of the current point is the model's

    def at(self, x, g) -> np.ndarray | None:
        """The model's matrix at x (None: none there, or the model is dropped); ``current`` records which."""
        H = self.hess(x, g) if self.hess is not None else None
        self.current = H is not None
        return H

    def update(self, x, g, B, scaled):
        """(B, scaled) from the model at x where it gives a matrix, else unchanged."""
        H = self.at(x, g)
        return (H, True) if H is not None else (B, scaled)

    def distrust(self) -> None:
        self.hess = None


def _descend(ev, x, fx, g, B, scaled, lower, bounded, ftol, maxeval, model=None):
    """Projected quasi-Newton iterations from (x, f, g) until a stopping test holds."""
    it = 0
    newton_dec = None       # the predicted decrease of the last Newton step on the model, if whole
    while True:
        at_bound = bounded & (x <= lower)
        d, dec = _free_step(B, g, at_bound)
        noise = _noise(fx)
        if not d.any():
            return "projected gradient zero", x, fx, g, B, scaled, it
        if scaled and dec <= max(ftol, noise):
            return "scaled gradient", x, fx, g, B, scaled, it
        if ev.nf >= maxeval:
            return "maxeval", x, fx, g, B, scaled, it
        alpha = 1.0
        if not scaled:          # no curvature yet: the step's length is a guess, bounded in θ
            alpha = min(1.0, FIRST_STEP / float(np.max(np.abs(d))))
        # The criterion rises steeply towards a bound (a variance → 0): a long quasi-Newton step
        # is shortened so that components far from their bound keep a fraction of the distance.
        far = bounded & (d < 0) & (x - lower > NEAR_BOUND)
        if far.any():
            alpha = min(alpha, float(np.min((1.0 - KEEP) * (x[far] - lower[far]) / -d[far])))
        # a unit step on the model's B; the last one if the previous was one too, predicting ≥ 1/CONTRACTION
        # times this one's decrease, so that the next would predict r·dec ≤ ftol (r = dec / newton_dec)
        newton = model is not None and model.hess is not None and model.current and alpha == 1.0
        last = newton and newton_dec is not None and dec <= CONTRACTION * newton_dec and dec * dec / newton_dec <= ftol
        accepted = None
        for trial in range(MAX_BACKTRACKS):
            xt = np.maximum(x + alpha * d, lower)
            # a step towards a bound ending within ON_BOUND of it ends on it: a Newton step stops
            # short of a boundary optimum by a fraction of the distance, and f is flat there
            onto = bounded & (d < 0) & (xt - lower < ON_BOUND)
            xt[onto] = lower[onto]
            s = xt - x
            if not s.any():
                break
            gs = float(g @ s)
            ft = ev.f(xt)
            if np.isfinite(ft) and ft <= fx + ARMIJO * gs:
                accepted = xt
                break
            if trial == 0 and model is not None:
                model.distrust()    # the model mispredicted f along its own step
            if np.isfinite(ft) and abs(ft - fx) <= noise and dec <= 100 * max(ftol, noise):
                break           # the trial's change is rounding: nothing left to gain at this scale
            if ev.nf >= maxeval:
                return "maxeval", x, fx, g, B, scaled, it
            # minimiser of the quadratic through f(0), f'(0) = gᵀs/α and f(α); kept in [α/10, α/2]
            curv = (ft - fx - gs) if np.isfinite(ft) else np.inf
            a_new = -gs * alpha / (2.0 * curv) if curv > 0 else 0.1 * alpha
            alpha = float(np.clip(a_new, 0.1 * alpha, 0.5 * alpha))
        if accepted is None:
            return "rounding", x, fx, g, B, scaled, it
        whole = newton and trial == 0 and np.array_equal(accepted, x + d)     # ft is f(accepted)
        if last and whole and abs((fx - ft) - dec) <= AGREEMENT * dec:
            # g is that of the previous point: nothing after a stop reads it, a restart evaluates its own
            return "predicted decrease", accepted, ft, g, B, scaled, it + 1
        newton_dec = dec if whole else None
        ft, gt = ev.fg(accepted)
        H = model.at(accepted, gt) if model is not None else None
        if H is not None:
            B = H
        else:
            s, y = accepted - x, gt - g
            sy = float(s @ y)
            if not scaled and sy > 0:
                B = B * (sy / float(s @ B @ s))
            B = _damped_bfgs(B, s, y)
        scaled = True
        x, fx, g = accepted, ft, gt
        it += 1


def _damped_bfgs(B: np.ndarray, s: np.ndarray, y: np.ndarray) -> np.ndarray:
    """BFGS update of the Hessian approximation with Powell's damping (Nocedal & Wright 18.2):
    y is moved towards Bs until sᵀy ≥ 0.2 sᵀBs, so B stays positive definite."""
    Bs = B @ s
    sBs = float(s @ Bs)
    if sBs <= 0:
        return B
    sy = float(s @ y)
    if sy < 0.2 * sBs:
        w = 0.8 * sBs / (sBs - sy)
        y = w * y + (1.0 - w) * Bs
        sy = float(s @ y)
    return B - np.outer(Bs, Bs) / sBs + np.outer(y, y) / sy
