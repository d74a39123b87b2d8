"""Segmentation metrics (official ISLES'24 case metrics)."""

from medsegdiff.metrics.isles24 import (
    METRIC_KEYS,
    OFFICIAL_METRICS,
    ISLES24Metric,
    case_metrics,
    connected_components,
    isles24_official_avd,
    summarize,
)

__all__ = [
    "METRIC_KEYS",
    "OFFICIAL_METRICS",
    "ISLES24Metric",
    "case_metrics",
    "connected_components",
    "isles24_official_avd",
    "summarize",
]
