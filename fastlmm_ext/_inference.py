"""Inference after the fit (issue: df and p-values, model comparison, intervals)."""
from __future__ import annotations


class InferenceMixin:
    """Methods of LmerResult for inference; implemented in this module."""
