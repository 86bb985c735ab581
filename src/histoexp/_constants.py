"""Constants shared across histoexp: platform geometry, image files, normalisation defaults.

One home for numbers and names that several modules need, so that they cannot drift apart.
"""

from __future__ import annotations

# ---------------------------------------------------------------------------------------------------------------------
# platform geometry (µm)
# ---------------------------------------------------------------------------------------------------------------------
#: diameter of a 10x Visium spot; µm/px of a Visium image is ``55 / spot_diameter_fullres``
VISIUM_SPOT_DIAMETER_UM = 55.0
#: diameter of a legacy Spatial Transcriptomics spot (her2st, ST-Net data)
ST_SPOT_DIAMETER_UM = 100.0
#: centre-to-centre distance of neighbouring legacy ST array positions
ST_PITCH_UM = 200.0

# ---------------------------------------------------------------------------------------------------------------------
# image files
# ---------------------------------------------------------------------------------------------------------------------
#: suffixes read with tifffile, by region and pyramid level; any other image file is decoded with PIL
TIFF_SUFFIXES = (".tif", ".tiff", ".ome.tif", ".ome.tiff", ".btf")
#: vendor whole-slide formats, read by region through tiffslide (or OpenSlide): the optional extra ``histoexp[slide]``
VENDOR_SUFFIXES = (".svs", ".ndpi", ".scn", ".bif", ".mrxs", ".vms", ".vmu", ".svslide")
#: vendor formats tiffslide does not read; only OpenSlide (openslide-python with openslide-bin) opens them
OPENSLIDE_ONLY_SUFFIXES = (".mrxs", ".vms", ".vmu", ".svslide")
#: suffixes recognised as a slide image when one is looked for in a folder (e.g. next to Space Ranger outputs)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", *TIFF_SUFFIXES, *VENDOR_SUFFIXES)
#: longest side (px) of the downscaled copy stored as ``uns['spatial'][library_id]['images']['hires']``
HIRES_MAX_SIDE = 2000

# ---------------------------------------------------------------------------------------------------------------------
# expression targets
# ---------------------------------------------------------------------------------------------------------------------
#: counts per spot after normalisation (as :func:`scanpy.pp.normalize_total` with ``target_sum=1e4``)
DEFAULT_TARGET_SUM = 1e4
