"""R's contrasts for factors in the fixed part: contr.treatment, contr.SAS, contr.sum,
contr.helmert, contr.poly and user matrices, with R's coefficient names.

A factor with K levels enters a model with an intercept as K×m coding matrix C (rows = levels):
the column of an observation at level j is the row C[j, :].  R's definitions (``?contrasts``):

* ``contr.treatment``: the indicators of every level but the base (first by default);
  names are the levels (``Incomehigh``).  ``contr.SAS`` is the same with the last level as base.
* ``contr.sum``: rows 1..K-1 are I_{K-1}, the last row is −1; names 1..K-1 (``Product1``).
* ``contr.helmert``: column j has −1 in rows 1..j, j in row j+1 and 0 below; names 1..K-1.
* ``contr.poly``: orthonormal polynomials in the scores 1..K — the Gram–Schmidt basis of the
  centred Vandermonde matrix [1, s, s², …] (QR with R's signs: positive diagonal of R) without
  its constant column; names ``.L .Q .C ^4 ^5 ...``.  Ordered factors get it by default.
* a matrix (levels × columns, as R's ``contrasts<-``): used as given; names its column names,
  else 1..m.

Where a factor must span the intercept (no intercept, or R's rule for the first factor of a
term whose margin is missing) R codes it by the indicators of all levels, whatever the
contrast; so does :class:`RContrasts` when formulaic asks for full rank.

The user's ``contrasts=`` mapping is checked here (:func:`check_contrast_names` before anything is
built, :func:`resolve_contrasts` against the factor levels) and R's spellings are the public
``contr`` namespace (``fl.contr.treatment(base="b")``).
"""
from __future__ import annotations

import warnings
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp
from formulaic.transforms.contrasts import Contrasts

from ._exceptions import ContrastsError, FastLMMWarning

__all__ = ["RContrasts", "contr", "check_contrast_names", "resolve_contrasts", "CONTRAST_NAMES"]

CONTRAST_NAMES = ("contr.treatment", "contr.SAS", "contr.sum", "contr.helmert", "contr.poly")


def poly_basis(scores: np.ndarray) -> np.ndarray:
    """R's make.poly: columns 0..K-1 of the orthonormal polynomial basis in ``scores`` (the QR
    factor Q of the centred Vandermonde matrix with each column's sign that of R's diagonal)."""
    y = np.asarray(scores, dtype=float)
    y = y - y.mean()
    V = y[:, None] ** np.arange(y.size)[None, :]
    Q, R = np.linalg.qr(V)
    return Q * np.sign(np.diag(R))[None, :]


@dataclass(eq=True)
class RContrasts(Contrasts):
    """One of R's contrasts (``kind``), or a user ``matrix`` (levels × columns).

    ``base`` (contr.treatment only) is the *label* of the reference level (R's ``base`` is its
    index; a label cannot silently shift when levels change)."""
    kind: str = "contr.treatment"
    base: Hashable | None = None
    matrix: tuple[tuple[float, ...], ...] | None = None
    colnames: tuple[str, ...] | None = None

    def __post_init__(self):
        if self.kind not in (*CONTRAST_NAMES, "matrix"):
            raise ContrastsError(f"unknown contrasts {self.kind!r}; choose one of {', '.join(CONTRAST_NAMES)}, "
                                 "or give a matrix (levels x columns)")
        if self.base is not None and self.kind != "contr.treatment":
            raise ContrastsError(f"base= is an argument of contr.treatment, not of {self.kind}")

    def __repr__(self) -> str:
        if self.kind == "matrix":
            return f"RContrasts(matrix {len(self.matrix)}x{len(self.matrix[0])})"
        return self.kind + ("()" if self.base is None else f"(base={self.base!r})")

    # -- R's coding matrices
    def base_index(self, levels: Sequence[Hashable]) -> int:
        if self.kind == "contr.SAS":
            return len(levels) - 1
        if self.base is None:
            return 0
        labels = [str(lv) for lv in levels]
        if str(self.base) not in labels:
            raise ContrastsError(f"contr.treatment base {self.base!r} is not a level (levels: "
                                 f"{', '.join(labels[:10])}{', ...' if len(labels) > 10 else ''})")
        return labels.index(str(self.base))

    def coding(self, levels: Sequence[Hashable]) -> np.ndarray:
        """The K × m coding matrix of a model with an intercept (R's ``contrasts(f)``)."""
        k = len(levels)
        if self.kind == "matrix":
            if len(self.matrix) != k:
                raise ContrastsError(f"contrast matrix has {len(self.matrix)} rows but the factor has {k} levels")
            return np.array(self.matrix, dtype=float)
        if self.kind in ("contr.treatment", "contr.SAS"):
            keep = [j for j in range(k) if j != self.base_index(levels)]
            return np.eye(k)[:, keep]
        if self.kind == "contr.sum":
            return np.vstack([np.eye(k - 1), -np.ones((1, k - 1))])
        if self.kind == "contr.helmert":
            C = np.zeros((k, k - 1))
            for j in range(k - 1):
                C[:j + 1, j] = -1.0
                C[j + 1, j] = j + 1.0
            return C
        return poly_basis(np.arange(1, k + 1))[:, 1:]

    def names(self, levels: Sequence[Hashable]) -> list[str]:
        k = len(levels)
        if self.kind == "matrix":
            return list(self.colnames) if self.colnames else [str(j + 1) for j in range(len(self.matrix[0]))]
        if self.kind in ("contr.treatment", "contr.SAS"):
            b = self.base_index(levels)
            return [str(lv) for j, lv in enumerate(levels) if j != b]
        if self.kind == "contr.poly":
            return [(".L", ".Q", ".C")[j - 1] if j <= 3 else f"^{j}" for j in range(1, k)]
        return [str(j) for j in range(1, k)]

    # -- formulaic's Contrasts interface
    @Contrasts.override
    def _get_coding_matrix(self, levels: Sequence[Hashable], reduced_rank: bool = True, sparse: bool = False):
        C = self.coding(levels) if reduced_rank else np.eye(len(levels))
        if sparse:
            return sp.csc_matrix(C)
        return C

    @Contrasts.override
    def get_coding_column_names(self, levels: Sequence[Hashable], reduced_rank: bool = True) -> Sequence[Hashable]:
        return self.names(levels) if reduced_rank else [str(lv) for lv in levels]

    @Contrasts.override
    def get_coefficient_row_names(self, levels: Sequence[Hashable], reduced_rank: bool = True) -> Sequence[Hashable]:
        return ["(Intercept)", *self.names(levels)] if reduced_rank else [str(lv) for lv in levels]


class contr:  # noqa: N801 - R's spelling: fl.contr.sum()
    """R's contrast functions, for the ``contrasts=`` argument: ``contr.treatment(base=None)``
    (``base``: the label of the reference level, default the first), ``contr.SAS()`` (last level
    as reference), ``contr.sum()``, ``contr.helmert()``, ``contr.poly()``.  The strings
    ``"contr.sum"`` etc. mean the same."""

    @staticmethod
    def treatment(base: Hashable | None = None) -> RContrasts:
        return RContrasts("contr.treatment", base=base)

    @staticmethod
    def SAS() -> RContrasts:  # noqa: N802 - R's name
        return RContrasts("contr.SAS")

    @staticmethod
    def sum() -> RContrasts:
        return RContrasts("contr.sum")

    @staticmethod
    def helmert() -> RContrasts:
        return RContrasts("contr.helmert")

    @staticmethod
    def poly() -> RContrasts:
        return RContrasts("contr.poly")


def _as_contrasts(column: str, spec) -> RContrasts:
    """One entry of ``contrasts=`` as :class:`RContrasts` (a name, a ``contr`` call, a matrix)."""
    if isinstance(spec, RContrasts):
        return spec
    if isinstance(spec, str):
        if spec not in CONTRAST_NAMES:
            raise ContrastsError(f"contrasts for column {column!r}: unknown contrasts {spec!r}; choose one of "
                                 f"{', '.join(CONTRAST_NAMES)}, fl.contr.treatment(base=...), or a matrix")
        return RContrasts(spec)
    if callable(spec) and getattr(spec, "__qualname__", "").startswith("contr."):
        return spec()
    colnames = None
    if isinstance(spec, pd.DataFrame):
        colnames = tuple(str(c) for c in spec.columns)
        spec = spec.to_numpy()
    try:
        M = np.array(spec, dtype=float)
    except (TypeError, ValueError):
        raise ContrastsError(f"contrasts for column {column!r} must be a contrast name ({', '.join(CONTRAST_NAMES)}), "
                             f"fl.contr.<name>(...) or a numeric matrix, got {type(spec).__name__}") from None
    if M.ndim != 2 or M.shape[1] == 0 or not np.isfinite(M).all():
        raise ContrastsError(f"contrast matrix for column {column!r} must be a finite 2-D matrix (levels x columns), "
                             f"got shape {M.shape}")
    return RContrasts("matrix", matrix=tuple(map(tuple, M.tolist())), colnames=colnames)


def check_contrast_names(contrasts, columns) -> dict[str, RContrasts]:
    """``contrasts=`` as {column: RContrasts}; every key must be a column of the data."""
    if contrasts is None:
        return {}
    if not isinstance(contrasts, Mapping):
        raise ContrastsError(f"contrasts must be a dict {{column: contrast}}, got {type(contrasts).__name__}")
    cols = set(map(str, columns))
    out = {}
    for col, spec in contrasts.items():
        if not isinstance(col, str) or (cols and col not in cols):
            raise ContrastsError(f"contrasts given for {col!r}, which is not a column of the data")
        out[col] = _as_contrasts(col, spec)
    return out


def resolve_contrasts(user: Mapping[str, RContrasts], frame: pd.DataFrame, fixed_columns) -> dict[str, RContrasts]:
    """The contrasts of every factor column the fixed part reads by name: the user's, checked
    against the factor's levels, else contr.poly for an ordered factor (R's default; treatment,
    formulaic's default, needs no entry).  A user entry for a column the fixed part does not
    use as a variable is ignored with a warning, as R does."""
    out: dict[str, RContrasts] = {}
    fixed = set(fixed_columns)
    for col, rc in user.items():
        if col not in fixed:
            warnings.warn(f"contrasts: variable {col!r} is absent from the fixed effects, its contrast is ignored",
                          FastLMMWarning, stacklevel=5)
            continue
        dt = frame[col].dtype
        if not isinstance(dt, pd.CategoricalDtype):
            raise ContrastsError(f"contrasts apply only to factors, but column {col!r} is numeric ({dt})")
        levels = list(dt.categories)
        try:
            C = rc.coding(levels)
        except ContrastsError as e:
            raise ContrastsError(f"contrasts for column {col!r}: {e}") from None
        if rc.kind == "matrix" and rc.colnames is not None and len(rc.colnames) != C.shape[1]:
            raise ContrastsError(f"contrast matrix for column {col!r} has {C.shape[1]} columns but "
                                 f"{len(rc.colnames)} column names")
        out[col] = rc
    for col in fixed:
        dt = frame[col].dtype if col in frame.columns else None
        if col not in out and isinstance(dt, pd.CategoricalDtype) and dt.ordered:
            out[col] = RContrasts("contr.poly")
    return out


def default_contrasts(frame: pd.DataFrame, columns) -> dict[str, RContrasts]:
    """R's defaults where they differ from formulaic's: contr.poly for ordered factors (the
    random-effects terms, which lme4 builds without the ``contrasts`` argument)."""
    return resolve_contrasts({}, frame, [c for c in columns if c in frame.columns])
