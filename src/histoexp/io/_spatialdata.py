"""AnnData <-> SpatialData at the boundary: image, spots as circles, table."""

from __future__ import annotations

import copy
import re
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from anndata import AnnData

from .._settings import logger

if TYPE_CHECKING:
    from spatialdata import SpatialData

#: bookkeeping written to ``table.uns`` by :func:`to_spatialdata`, read back by :func:`from_spatialdata`
_BOOK = "histoexp_spatialdata"
_REGION_KEY = "region"
_INSTANCE_KEY = "spot_id"
_MAX_HIRES_SIDE = 4000
#: image scales larger than this (pixels) are never materialised whole: the hires copy is read by region
_MAX_DENSE_IMAGE_PX = 64_000_000
#: shapes of Visium HD bins as spatialdata_io names them (``<dataset>_square_008um``): the bin side in µm
_HD_BIN = re.compile(r"square_(\d+)um$")


def _libraries(adata: AnnData, library_key: str | None) -> tuple[str | None, dict[str, np.ndarray]]:
    """Map library id -> boolean mask of its spots."""
    spatial = adata.uns.get("spatial", {})
    if library_key is None:
        if len(spatial) <= 1:
            lib = next(iter(spatial), "library")
            return None, {str(lib): np.ones(adata.n_obs, dtype=bool)}
        if "library_id" in adata.obs:
            library_key = "library_id"
        else:
            raise ValueError(
                f"`library_key`: adata.uns['spatial'] has {len(spatial)} libraries {list(spatial)} but no "
                "`library_key` was given and obs has no 'library_id' column; pass the obs column naming each spot's "
                "library."
            )
    if library_key not in adata.obs:
        raise KeyError(f"`library_key={library_key!r}` is not a column of adata.obs; found {list(adata.obs.columns)}.")
    col = adata.obs[library_key].astype(str).to_numpy()
    libs = pd.unique(col)
    return library_key, {str(lib): col == lib for lib in libs}


def to_spatialdata(adata: AnnData, *, library_key: str | None = None) -> SpatialData:
    """Convert an AnnData with ``obsm['spatial']``/``uns['spatial']`` to a :class:`~spatialdata.SpatialData`.

    One coordinate system per library, named after the library id, in full-resolution image pixels.
    For each library ``lib``:

    - ``images[f"{lib}_hires_image"]``: the ``'hires'`` image of ``uns['spatial'][lib]['images']`` (``c, y, x``,
      RGB: an alpha channel is dropped), with a ``Scale(1 / tissue_hires_scalef)`` transformation to ``lib``;
      ``f"{lib}_lowres_image"`` with ``tissue_lowres_scalef`` instead when there is no hires image or it is a
      single colour (a placeholder). Absent if the library has no image; the full-resolution image stays on
      disk, referenced by ``metadata['source_image_path']``;
    - ``shapes[f"{lib}_spots"]``: circles at ``obsm['spatial']`` with ``radius = spot_diameter_fullres / 2``
      (Identity to ``lib``), indexed by ``obs_names``.

    ``tables['table']`` is a copy of `adata` annotating those shapes (``obs['region']``, instance key
    ``obs['spot_id']`` = ``obs_names``); its ``uns['spatial']`` keeps scalefactors and metadata without the
    pixel arrays, which live in the image elements. :func:`from_spatialdata` restores the AnnData.

    Parameters
    ----------
    adata
        AnnData with ``obsm['spatial']`` and ``uns['spatial']``.
    library_key
        obs column naming each spot's library; not needed for a single library (default ``'library_id'`` if
        present for several).

    Returns
    -------
    The SpatialData object (in memory; write it with ``sdata.write(path)``).
    """
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Identity, Scale

    if "spatial" not in adata.obsm:
        raise KeyError("`adata`: obsm['spatial'] (full-resolution spot centres) is required.")
    key, masks = _libraries(adata, library_key)
    spatial_uns = adata.uns.get("spatial", {})
    xy = np.asarray(adata.obsm["spatial"], dtype=float)

    images: dict[str, Any] = {}
    shapes: dict[str, Any] = {}
    regions = np.empty(adata.n_obs, dtype=object)
    book: dict[str, Any] = {"library_key": key or "", "regions": {}, "images": {}}
    for lib, mask in masks.items():
        entry = spatial_uns.get(lib, {})
        sf = entry.get("scalefactors", {})
        region = f"{lib}_spots"
        regions[mask] = region
        book["regions"][region] = lib
        d = sf.get("spot_diameter_fullres")
        if d is None:
            logger.warning("to_spatialdata(%s): no spot_diameter_fullres; circles get radius 1 px.", lib)
            d = 2.0
        shapes[region] = ShapesModel.parse(
            xy[mask],
            geometry=0,
            radius=np.full(int(mask.sum()), float(d) / 2),
            index=pd.Index(adata.obs_names[mask].astype(str), name=_INSTANCE_KEY),
            transformations={lib: Identity()},
        )
        picked = _image_to_export(entry, lib)
        if picked is not None:
            img_key, arr = picked
            s = float(sf.get(f"tissue_{img_key}_scalef", 1.0))
            name = f"{lib}_{img_key}_image"
            images[name] = Image2DModel.parse(
                np.moveaxis(arr, -1, 0),
                dims=("c", "y", "x"),
                c_coords=["r", "g", "b"],
                transformations={lib: Scale([1 / s, 1 / s], axes=("y", "x"))},
            )
            book["images"][lib] = name

    table = AnnData(
        X=adata.X.copy() if adata.X is not None else None,
        obs=adata.obs.copy(),
        var=adata.var.copy(),
        obsm={k: v.copy() for k, v in adata.obsm.items()},
        varm={k: v.copy() for k, v in adata.varm.items()},
        layers={k: v.copy() for k, v in adata.layers.items()},
        obsp={k: v.copy() for k, v in adata.obsp.items()},
        uns=copy.deepcopy({k: v for k, v in adata.uns.items() if k != "spatial"}),
    )
    table.uns["spatial"] = {
        lib: {k: _bytes_to_str(copy.deepcopy(v)) for k, v in entry.items() if k != "images"}
        for lib, entry in spatial_uns.items()
    }
    for col in (_REGION_KEY, _INSTANCE_KEY):
        if col in table.obs:
            raise ValueError(f"`adata`: obs already has a {col!r} column, which to_spatialdata uses; rename it.")
    table.obs[_REGION_KEY] = pd.Categorical(regions, categories=list(book["regions"]))
    table.obs[_INSTANCE_KEY] = adata.obs_names.astype(str).to_numpy()
    table.uns[_BOOK] = book
    table = TableModel.parse(table, region=list(book["regions"]), region_key=_REGION_KEY, instance_key=_INSTANCE_KEY)
    return SpatialData(images=images, shapes=shapes, tables={"table": table})


def _bytes_to_str(value: Any) -> Any:
    """Byte strings (Space Ranger metadata read by squidpy) as text: zarr v3 has no stable byte-string type."""
    if isinstance(value, dict):
        return {k: _bytes_to_str(v) for k, v in value.items()}
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray) and value.dtype.kind == "S":
        text = np.char.decode(value, "utf-8", "replace")
        return str(text.item()) if text.size == 1 else text.astype(str)
    return value


def _image_to_export(entry: dict, lib: str) -> tuple[str, np.ndarray] | None:
    """(key, RGB uint8 array) of the image ``to_spatialdata`` writes: ``'hires'``, else ``'lowres'``.

    An alpha channel is dropped; an image of a single colour (a placeholder, as the all-black hires PNG of
    scanpy's Visium test fixture) is skipped with a warning, so the image with the tissue is the one kept.
    """
    for key in ("hires", "lowres"):
        img = entry.get("images", {}).get(key)
        if img is None:
            continue
        arr = np.asarray(img)
        if arr.ndim == 3 and arr.shape[2] == 4:
            arr = arr[..., :3]
        if arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(f"`adata`: uns['spatial'][{lib!r}]['images'][{key!r}] has shape {arr.shape}.")
        if arr.dtype != np.uint8 and arr.dtype.kind == "f" and arr.size and arr.max() <= 1.0:
            arr = (arr * 255).round().astype(np.uint8)  # scanpy/squidpy store float [0, 1] images
        if arr.size and (arr == arr[0, 0]).all():
            logger.warning("to_spatialdata(%s): images[%r] is a single colour (a placeholder?); not written.", lib, key)
            continue
        return key, np.ascontiguousarray(arr)
    return None


def _affine(elem, cs: str) -> np.ndarray:
    from spatialdata.transformations import get_transformation

    t = get_transformation(elem, to_coordinate_system=cs)
    return np.asarray(t.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")), dtype=float)


def _image_yxc(elem) -> np.ndarray:
    """Highest-resolution scale of an image element as an (y, x, c) numpy array."""
    from xarray import DataArray

    if not isinstance(elem, DataArray):  # multiscale DataTree
        first = sorted(elem.children)[0]
        elem = next(iter(elem[first].data_vars.values()))
    arr = elem.transpose("y", "x", "c").data
    return np.asarray(arr)


def _largest_scale_px(elem) -> int:
    from xarray import DataArray

    if not isinstance(elem, DataArray):
        first = sorted(elem.children)[0]
        elem = next(iter(elem[first].data_vars.values()))
    return int(elem.sizes["y"]) * int(elem.sizes["x"])


def _bounded_rgb(elem, max_side: int) -> tuple[np.ndarray, float] | None:
    """Copy (longer side <= ``max_side``) of a large RGB uint8 image element and its scale, read by region.

    ``None`` when the element is not RGB uint8 (the caller converts it the old way).
    """
    from ..image import SlideImage

    try:
        slide = SlideImage.open(elem)
    except ValueError:
        return None
    return slide.thumbnail(max_side)


def _pick_image(sdata, shapes_elem, region: str, preferred: str | None):
    """(image name, element, hires scalef) of an image sharing a coordinate system with ``region``."""
    from spatialdata.transformations import get_transformation

    cs_shapes = set(get_transformation(shapes_elem, get_all=True))
    cands = []
    for name, img in sdata.images.items():
        common = cs_shapes & set(get_transformation(img, get_all=True))
        if common:
            cands.append((name, img, sorted(common)[0]))
    if not cands:
        return None
    if preferred is not None:
        cands = [c for c in cands if c[0] == preferred] or cands
    else:  # prefer an image called *hires*, then the smallest one
        hires = [c for c in cands if "hires" in c[0]]
        cands = hires or cands
    name, img, cs = cands[0]
    m = np.linalg.inv(_affine(img, cs)) @ _affine(shapes_elem, cs)  # shapes px -> image px
    lin = m[:2, :2]
    scalef = float(np.sqrt(abs(np.linalg.det(lin))))
    if not np.allclose(lin, np.diag(np.diag(lin)), atol=1e-6 * max(scalef, 1e-12)) or not np.allclose(
        lin[0, 0], lin[1, 1], rtol=1e-6
    ):
        logger.warning(
            "from_spatialdata(%s): image %r is not an isotropic scaling of the spots; approximated.", region, name
        )
    if not np.allclose(m[:2, 2], 0, atol=1e-6):
        logger.warning("from_spatialdata(%s): image %r is translated relative to the spots; ignored.", region, name)
    return name, img, scalef


def _fullres_zarr_path(sdata, shapes_elem) -> str:
    """Path of an on-disk image element at the shapes' own pixel scale (the full-resolution H&E), else ``''``.

    Recorded as ``metadata['source_image_path']``, so patches are read from the full-resolution image by region
    (zarr), later and in other processes too, instead of from the downscaled hires copy.
    """
    from spatialdata.transformations import get_transformation

    from ..image._slide import _backing_zarr_image

    cs_shapes = set(get_transformation(shapes_elem, get_all=True))
    for img in sdata.images.values():
        common = sorted(cs_shapes & set(get_transformation(img, get_all=True)))
        if not common:
            continue
        m = np.linalg.inv(_affine(img, common[0])) @ _affine(shapes_elem, common[0])
        if np.allclose(m[:2, :2], np.eye(2), atol=1e-6) and np.allclose(m[:2, 2], 0, atol=1e-6):
            path = _backing_zarr_image(img)
            if path:
                return path
    return ""


def from_spatialdata(sdata: SpatialData, *, table_key: str = "table") -> AnnData:
    """Convert a :class:`~spatialdata.SpatialData` table annotating circle shapes to a squidpy-style AnnData.

    Inverse of :func:`to_spatialdata`, and also works for SpatialData objects from :mod:`spatialdata_io`
    (e.g. ``spatialdata_io.visium``): for each region (a shapes element of circles) annotated by the table,

    - ``obsm['spatial']`` = circle centres (polygon centroids for polygons, e.g. Visium HD bins) in the shapes'
      own coordinates (full-resolution pixels);
    - ``uns['spatial'][lib]['images']['hires']`` = the image element that shares a coordinate system with the
      shapes (the one :func:`to_spatialdata` wrote, else one named ``*hires*``, else the first), downscaled to
      at most 4000 px if larger; ``scalefactors['tissue_hires_scalef']`` = image px per spot px;
    - ``scalefactors['spot_diameter_fullres']`` = ``2 * median(radius)`` (polygons: the diameter of a circle of
      their median area) unless the table already records it;
    - scalefactors/metadata stored in ``table.uns['spatial'][lib]`` are kept;
    - ``metadata['source_image_path']``: when `sdata` was read from zarr and holds an image at the shapes' own
      pixel scale (e.g. ``spatialdata_io.visium_hd``'s ``*_full_image``), the path of that image element
      (``<sdata>.zarr/images/<name>``): :func:`histoexp.pp.extract_patches` then reads patches from the
      full-resolution image by region, never decoding it whole.

    ``lib`` is the library id recorded by :func:`to_spatialdata`, else the region name. The region and
    instance-key columns added by :func:`to_spatialdata` are dropped again.

    Parameters
    ----------
    sdata
        SpatialData object.
    table_key
        Name of the table in ``sdata.tables``.

    Returns
    -------
    A new AnnData.
    """
    from spatialdata.models import get_table_keys

    if table_key not in sdata.tables:
        raise KeyError(f"`table_key={table_key!r}` not found; sdata.tables has {list(sdata.tables)}.")
    table = sdata.tables[table_key]
    region, region_key, instance_key = get_table_keys(table)
    regions = [region] if isinstance(region, str) else list(region)
    book = copy.deepcopy(dict(table.uns.get(_BOOK, {})))
    adata = table.copy()
    adata.uns.pop(_BOOK, None)
    adata.uns.pop("spatialdata_attrs", None)
    spatial_in = copy.deepcopy(dict(adata.uns.pop("spatial", {})))
    obs_region = adata.obs[region_key].astype(str).to_numpy()
    instance = adata.obs[instance_key].to_numpy()

    xy = np.full((adata.n_obs, 2), np.nan)
    spatial: dict[str, Any] = {}
    libs = np.empty(adata.n_obs, dtype=object)
    for reg in regions:
        if reg not in sdata.shapes:
            logger.warning("from_spatialdata: region %r is not a shapes element; skipped.", reg)
            continue
        gdf = sdata.shapes[reg]
        rows = np.flatnonzero(obs_region == reg)
        if rows.size == 0:
            continue
        lib = str(book.get("regions", {}).get(reg, reg))
        libs[rows] = lib
        pos = gdf.index.get_indexer(pd.Index(instance[rows]).astype(gdf.index.dtype))
        if (pos < 0).any():
            raise ValueError(f"`sdata`: {int((pos < 0).sum())} table rows of region {reg!r} have no matching shape.")
        geom = gdf.geometry.iloc[pos]
        is_point = (geom.geom_type == "Point").all()
        centres = geom if is_point else geom.centroid  # polygons (e.g. Visium HD bins): their centroids
        xy[rows, 0], xy[rows, 1] = centres.x.to_numpy(), centres.y.to_numpy()

        entry = copy.deepcopy(dict(spatial_in.get(lib, {})))
        sf = dict(entry.get("scalefactors", {}))
        meta = dict(entry.get("metadata", {}))
        hd = _HD_BIN.search(str(reg))
        if hd is not None and "microns_per_pixel" not in sf:
            # Visium HD bins (spatialdata_io): squares (or circles) one bin wide; the bin's side in µm gives the
            # µm/px, which the 55 µm Visium spot rule would get wrong by the ratio of the sizes
            bin_um = float(hd.group(1))
            side_px = (
                float(2 * np.median(gdf["radius"].to_numpy()))
                if "radius" in gdf
                else float(np.sqrt(np.median(geom.area.to_numpy())))
            )
            sf.setdefault("spot_diameter_fullres", side_px)
            sf["microns_per_pixel"] = bin_um / side_px
            meta.update(platform="visium_hd", bin_size_um=bin_um)
            logger.info("from_spatialdata(%s): Visium HD %g µm bins, %.4g µm/px.", reg, bin_um, bin_um / side_px)
        if "spot_diameter_fullres" not in sf:
            if "radius" in gdf:
                sf["spot_diameter_fullres"] = float(2 * np.median(gdf["radius"].to_numpy()))
            elif not is_point:  # diameter of the circle with the polygons' median area
                sf["spot_diameter_fullres"] = float(2 * np.sqrt(np.median(geom.area.to_numpy()) / np.pi))
        if not meta.get("source_image_path"):
            meta["source_image_path"] = _fullres_zarr_path(sdata, gdf)
        picked = _pick_image(sdata, gdf, reg, book.get("images", {}).get(lib))
        if picked is not None:
            name, img, scalef = picked
            bounded = _bounded_rgb(img, _MAX_HIRES_SIDE) if _largest_scale_px(img) > _MAX_DENSE_IMAGE_PX else None
            if bounded is not None:  # e.g. a full-resolution HD image: never decoded whole
                arr, f = bounded
                scalef *= f
            else:
                arr = _image_yxc(img)
            if arr.dtype != np.uint8:
                logger.warning("from_spatialdata(%s): image %r is %s, converted to uint8.", lib, name, arr.dtype)
                arr = np.clip(arr, 0, 255).astype(np.uint8)
            if arr.shape[-1] != 3:
                logger.warning("from_spatialdata(%s): image %r has %d channels; not stored.", lib, name, arr.shape[-1])
            else:
                if max(arr.shape[:2]) > _MAX_HIRES_SIDE:
                    from PIL import Image

                    f = _MAX_HIRES_SIDE / max(arr.shape[:2])
                    size = (max(1, round(arr.shape[1] * f)), max(1, round(arr.shape[0] * f)))
                    arr = np.asarray(Image.fromarray(arr).resize(size, Image.Resampling.LANCZOS))
                    scalef *= f
                entry["images"] = {"hires": np.ascontiguousarray(arr)}
                sf["tissue_hires_scalef"] = float(scalef)
        entry["scalefactors"], entry["metadata"] = sf, meta
        spatial[lib] = entry

    if np.isnan(xy).any():
        logger.warning(
            "from_spatialdata: %d rows have no shape; obsm['spatial'] is NaN there.", int(np.isnan(xy).any(1).sum())
        )
    adata.obsm["spatial"] = xy
    adata.uns["spatial"] = spatial
    if book:
        adata.obs.drop(columns=[c for c in (region_key, instance_key) if c in adata.obs], inplace=True)
        key = book.get("library_key") or None
        if key is not None and key in adata.obs and not isinstance(adata.obs[key].dtype, pd.CategoricalDtype):
            adata.obs[key] = pd.Categorical(adata.obs[key])
    elif "library_id" not in adata.obs:
        adata.obs["library_id"] = pd.Categorical(libs.astype(str), categories=list(spatial) or None)
    return adata
