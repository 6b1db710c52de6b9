"""Numerical derivatives by central differences with Richardson extrapolation (the scheme of R's
numDeriv, which lmerTest uses for Satterthwaite's method).

A derivative is estimated at steps h, h/2, h/4, ... (h = d·|x_i|, or ``eps`` where x_i is near
zero) and the estimates, whose errors are series in h², h⁴, ..., are combined by Richardson
extrapolation.  The Hessian's diagonal uses (f(x + h eᵢ) − 2f(x) + f(x − h eᵢ))/h², its
off-diagonal (f(x + hᵢeᵢ + hⱼeⱼ) − 2f(x) + f(x − hᵢeᵢ − hⱼeⱼ) − Hᵢᵢhᵢ² − Hⱼⱼhⱼ²)/(2hᵢhⱼ); the
Jacobian of an array-valued g uses (g(x + h eᵢ) − g(x − h eᵢ))/(2h).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["DerivOptions", "HESSIAN_STEPS", "JACOBIAN_STEPS", "hessian_richardson", "jacobian_richardson"]


def _step_sizes(x: np.ndarray, d: float, eps: float, zero_tol: float) -> np.ndarray:
    """Initial steps h_i = d·|x_i|, or eps where |x_i| is (near) zero."""
    return np.abs(d * x) + eps * (np.abs(x) < zero_tol)


def _richardson(approx: list, r: int) -> object:
    """Richardson extrapolation of r central-difference estimates taken at steps h, h/2, h/4, ...
    (error series in h², h⁴, ...): repeatedly combine neighbours as (4^m a_{k+1} − a_k)/(4^m − 1)."""
    a = list(approx)
    for m in range(1, r):
        a = [(a[k + 1] * 4.0 ** m - a[k]) / (4.0 ** m - 1.0) for k in range(len(a) - 1)]
    return a[0]


@dataclass(frozen=True)
class DerivOptions:
    d: float = 1e-4          # relative initial step (numDeriv: 0.1 for Hessians, 1e-4 for Jacobians)
    eps: float = 1e-4        # absolute initial step for parameters at (or near) zero
    zero_tol: float = math.sqrt(np.finfo(float).eps / 7e-7)
    r: int = 4               # number of step halvings (Richardson terms)


HESSIAN_STEPS = DerivOptions(d=0.1)
JACOBIAN_STEPS = DerivOptions(d=1e-4)


def hessian_richardson(f, x: np.ndarray, opts: DerivOptions = HESSIAN_STEPS) -> np.ndarray:
    """Hessian of a scalar f at x.

    Diagonal: (f(x + h eᵢ) − 2f(x) + f(x − h eᵢ))/h².  Off-diagonal, reusing the diagonal:
    (f(x + hᵢeᵢ + hⱼeⱼ) − 2f(x) + f(x − hᵢeᵢ − hⱼeⱼ) − Hᵢᵢhᵢ² − Hⱼⱼhⱼ²)/(2hᵢhⱼ).  Each at
    steps h, h/2, ..., h/2^{r−1}, combined by Richardson extrapolation."""
    x = np.asarray(x, dtype=float)
    n = x.size
    f0 = f(x)
    h0 = _step_sizes(x, opts.d, opts.eps, opts.zero_tol)
    H = np.zeros((n, n))
    for i in range(n):
        est = []
        h = h0.copy()
        for _ in range(opts.r):
            e = np.zeros(n)
            e[i] = h[i]
            est.append((f(x + e) - 2.0 * f0 + f(x - e)) / h[i] ** 2)
            h = h / 2.0
        H[i, i] = _richardson(est, opts.r)
    for i in range(n):
        for j in range(i):
            est = []
            h = h0.copy()
            for _ in range(opts.r):
                e = np.zeros(n)
                e[i], e[j] = h[i], h[j]
                est.append((f(x + e) - 2.0 * f0 + f(x - e) - H[i, i] * h[i] ** 2 - H[j, j] * h[j] ** 2)
                           / (2.0 * h[i] * h[j]))
                h = h / 2.0
            H[i, j] = H[j, i] = _richardson(est, opts.r)
    return H


def jacobian_richardson(g, x: np.ndarray, opts: DerivOptions = JACOBIAN_STEPS) -> list[np.ndarray]:
    """Derivatives ∂g/∂x_i (g array-valued) by central differences (g(x + h eᵢ) − g(x − h eᵢ))/(2h)
    with Richardson extrapolation over h, h/2, ...; returns one array per x_i."""
    x = np.asarray(x, dtype=float)
    n = x.size
    h0 = _step_sizes(x, opts.d, opts.eps, opts.zero_tol)
    out = []
    for i in range(n):
        est = []
        h = h0[i]
        for _ in range(opts.r):
            e = np.zeros(n)
            e[i] = h
            est.append((np.asarray(g(x + e)) - np.asarray(g(x - e))) / (2.0 * h))
            h = h / 2.0
        out.append(_richardson(est, opts.r))
    return out
