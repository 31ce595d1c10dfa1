"""Geospatial domain: place names read by a language model (:class:`GeospatialAdapter`, registered
as ``geospatial``). The spatial statistics it uses live in :mod:`sciscope.core.spatial`."""

from .adapter import GeospatialAdapter, default_model_dir
from .data import median_error_km

__all__ = ["GeospatialAdapter", "default_model_dir", "median_error_km"]
