"""Tests for histoexp.datasets.her2st / her2st_gene_panel on the real data, including the pooch download path."""

from __future__ import annotations

import functools
import http.server
import logging
import threading

import numpy as np
import pandas as pd
import pytest

import histoexp as hx
from histoexp.datasets import _her2st, _registry

# intersection of the count matrix and the spot file (spot files: 187/182/187/183/179 rows)
EXPECTED_SPOTS = {"C2": 187, "C3": 180, "C4": 184, "C5": 181, "C6": 178}
SECTIONS_C = list(EXPECTED_SPOTS)


@pytest.fixture(scope="session")
def her2st_c(her2st_dir):
    """C2..C6 in one object (read-only)."""
    return hx.datasets.her2st(SECTIONS_C, data_dir=her2st_dir)


def test_registry_pins_the_published_files(her2st_dir):
    import pooch

    reg = _registry.REGISTRY
    assert _registry.BASE_URL == "https://github.com/almaan/her2st/raw/master/"
    assert sum(k.startswith("data/ST-cnts/") for k in reg) == 35
    assert sum(k.startswith("data/ST-spotfiles/") for k in reg) == 35
    assert sum(k.startswith("data/ST-imgs/") for k in reg) == 5
    for h in reg.values():
        assert h.startswith("sha256:") and len(h) == 7 + 64
    # every pinned hash matches the local copy of the published files (spot-check a mix, plus all images)
    check = [k for k in reg if k.startswith("data/ST-imgs/")] + [
        "data/ST-cnts/C2.tsv.gz",
        "data/ST-spotfiles/A1_selection.tsv",
    ]
    for rel in check:
        assert "sha256:" + pooch.file_hash(str(her2st_dir / rel)) == reg[rel], rel


def test_c_sections_load_with_the_right_spot_counts(her2st_c, her2st_dir):
    a = her2st_c
    assert isinstance(a.obs["library_id"].dtype, pd.CategoricalDtype)
    assert a.obs["library_id"].cat.categories.tolist() == SECTIONS_C
    assert a.obs["library_id"].value_counts().to_dict() == EXPECTED_SPOTS
    assert a.n_obs == sum(EXPECTED_SPOTS.values())
    assert 13_000 < a.n_vars < 16_000  # genes in every C count file (join='inner')
    assert a.X.dtype == np.float32 and a.X.format == "csr"
    assert a.X.sum() > 1e6 and float(a.X.max()) == int(a.X.max())
    assert a.obs_names.is_unique and a.obs_names[0] == "C2_25x13"
    assert set(a.uns["spatial"]) == set(SECTIONS_C)
    for lib in SECTIONS_C:
        entry = a.uns["spatial"][lib]
        sf, meta = entry["scalefactors"], entry["metadata"]
        H, W = meta["fullres_shape"]
        assert 9200 < W < 9400 and 9800 < H < 10000
        xy = a.obsm["spatial"][(a.obs["library_id"] == lib).to_numpy()]
        assert (xy >= 0).all() and (xy[:, 0] < W).all() and (xy[:, 1] < H).all()
        assert meta["microns_per_pixel"] == pytest.approx(0.687, abs=0.01)
        assert sf["microns_per_pixel"] == meta["microns_per_pixel"]
        assert meta["mpp_source"] == "spot grid"
        assert sf["spot_diameter_fullres"] == pytest.approx(145, abs=3)
        assert sf["spot_diameter_fullres"] == pytest.approx(100 / meta["microns_per_pixel"])
        hires = entry["images"]["hires"]
        assert hires.dtype == np.uint8 and max(hires.shape[:2]) == 2000 and hires.shape[2] == 3
        s = sf["tissue_hires_scalef"]
        assert hires.shape[:2] == (round(H * s), round(W * s))
        assert meta["source_image_path"].startswith(str(her2st_dir.resolve()))
        assert meta["source_image_path"].endswith(".jpg")
        # spots sit on tissue: darker than the glass background of the hires image
        ij = np.round(xy * s).astype(int)
        on_spots = hires[ij[:, 1], ij[:, 0]].mean()
        corners = np.concatenate([hires[:40, :40].reshape(-1, 3), hires[-40:, -40:].reshape(-1, 3)]).mean()
        assert on_spots < corners - 20


def test_single_section_and_fixture(her2st_c2, her2st_c):
    a = her2st_c2
    assert a.n_obs == EXPECTED_SPOTS["C2"]
    assert 15_000 < a.n_vars < 16_000
    assert list(a.uns["spatial"]) == ["C2"]
    assert a.obs["library_id"].cat.categories.tolist() == ["C2"]
    assert a.uns["spatial"]["C2"]["metadata"]["dataset"] == "her2st"
    # same spots and counts as in the multi-section object (restricted to the shared genes)
    b = her2st_c[her2st_c.obs["library_id"] == "C2"]
    assert list(b.obs_names) == list(a.obs_names)
    assert (a[:, b.var_names].X != b.X).nnz == 0


def test_count_only_section_and_custom_library_key(her2st_dir, caplog):
    with caplog.at_level(logging.INFO, logger="histoexp"):
        a = hx.datasets.her2st(["A1", "C1"], data_dir=her2st_dir / "data", library_key="section", join="outer")
    assert "no H&E image" in caplog.text
    assert "library_id" not in a.obs and a.obs["section"].cat.categories.tolist() == ["A1", "C1"]
    assert set(a.uns["spatial"]) == {"A1", "C1"}
    for lib in ("A1", "C1"):
        entry = a.uns["spatial"][lib]
        assert "images" not in entry
        assert entry["scalefactors"]["tissue_hires_scalef"] == 1.0
        assert entry["metadata"]["source_image_path"] == ""
        assert entry["metadata"]["mpp_source"] == "spot grid"
        assert entry["scalefactors"]["spot_diameter_fullres"] > 50
    n1 = (a.obs["section"] == "A1").sum()
    assert n1 > 300
    # outer join: all genes of either file, zero where a section lacks a gene
    assert a.n_vars > 15_000
    # squidpy can plot a count-only section (spots sized from the scalefactors, no image)
    import matplotlib.pyplot as plt
    import squidpy as sq

    a1 = a[a.obs["section"] == "A1"]
    sq.pl.spatial_scatter(a1, color="ERBB2", library_key="section", library_id="A1", img=False)
    plt.close("all")


def test_h5ad_round_trip_multi_section(her2st_c, tmp_path):
    import anndata as ad

    sub = her2st_c[her2st_c.obs["library_id"].isin(["C2", "C3"])].copy()
    sub.write_h5ad(tmp_path / "c.h5ad")
    back = ad.read_h5ad(tmp_path / "c.h5ad")
    assert (back.X != sub.X).nnz == 0
    pd.testing.assert_frame_equal(back.obs, sub.obs)
    np.testing.assert_array_equal(back.obsm["spatial"], sub.obsm["spatial"])
    for lib in SECTIONS_C:
        np.testing.assert_array_equal(
            back.uns["spatial"][lib]["images"]["hires"], sub.uns["spatial"][lib]["images"]["hires"]
        )
        assert back.uns["spatial"][lib]["scalefactors"] == sub.uns["spatial"][lib]["scalefactors"]
        assert back.uns["spatial"][lib]["metadata"]["mpp_source"] == "spot grid"
        assert (
            list(back.uns["spatial"][lib]["metadata"]["fullres_shape"])
            == sub.uns["spatial"][lib]["metadata"]["fullres_shape"]
        )


def test_section_validation():
    assert _her2st._expand("C") == ["C1", "C2", "C3", "C4", "C5", "C6"]
    assert _her2st._expand(["C2", "A1"]) == ["C2", "A1"]
    assert len(_her2st._sections()) == 35 and "B4" not in _her2st._sections()
    with pytest.raises(ValueError, match="unknown her2st section 'Z9'.*'C2'"):
        hx.datasets.her2st("Z9")
    with pytest.raises(ValueError, match="duplicated"):
        hx.datasets.her2st(["C2", "C"])
    with pytest.raises(ValueError, match="empty"):
        hx.datasets.her2st([])
    with pytest.raises(ValueError, match="`join`"):
        hx.datasets.her2st("C2", join="left")
    with pytest.raises(FileNotFoundError, match="`data_dir`"):
        hx.datasets.her2st("C2", data_dir="/nonexistent/her2st")


def test_gene_panel(her2st_dir, her2st_c2):
    genes = hx.datasets.her2st_gene_panel()
    assert len(genes) == 785 and len(set(genes)) == 785
    assert genes[:3] == ["HPS6", "TNC", "NR1H2"] and genes[-1] == "TNFRSF14"
    assert genes == [g.strip() for g in (her2st_dir / "genes_785.txt").read_text().splitlines() if g.strip()]
    assert np.isin(genes, her2st_c2.var_names).mean() > 0.95


# --------------------------------------------------------------------------------------------------------------------
# download path: a real pooch fetch + sha256 check, served offline from 127.0.0.1
# --------------------------------------------------------------------------------------------------------------------
@pytest.fixture
def local_server(her2st_dir):
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            requests.append(self.path)

    handler = functools.partial(Handler, directory=str(her2st_dir))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", requests
    server.shutdown()
    server.server_close()


@pytest.fixture
def offline_cache(tmp_path, monkeypatch, local_server):
    url, requests = local_server
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setattr(_registry, "BASE_URL", url)
    monkeypatch.setattr(hx.settings, "_data_dir", tmp_path / "cache")
    return tmp_path / "cache" / "her2st", requests


def test_download_with_pooch_and_hash_check(offline_cache, her2st_c2, caplog):
    cache, requests = offline_cache
    with caplog.at_level(logging.INFO, logger="histoexp"):
        a = hx.datasets.her2st("C2")  # nothing local: fetched from the server into settings.data_dir / 'her2st'
    assert sorted(requests) == sorted(
        [
            "/data/ST-cnts/C2.tsv.gz",
            "/data/ST-spotfiles/C2_selection.tsv",
            "/data/ST-imgs/C/C2/5714_HE_BT_C2.jpg",
        ]
    )
    assert (cache / "data/ST-imgs/C/C2/5714_HE_BT_C2.jpg").is_file()
    assert "fetching" in caplog.text
    assert a.uns["spatial"]["C2"]["metadata"]["source_image_path"] == str(
        (cache / "data/ST-imgs/C/C2/5714_HE_BT_C2.jpg").resolve()
    )
    assert (a.X != her2st_c2.X).nnz == 0
    assert a.uns["spatial"]["C2"]["scalefactors"] == her2st_c2.uns["spatial"]["C2"]["scalefactors"]
    # second call: served from the cache, no request
    requests.clear()
    b = hx.datasets.her2st("C2")
    assert requests == [] and b.n_obs == a.n_obs


def test_download_rejects_a_wrong_hash(offline_cache, monkeypatch):
    cache, requests = offline_cache
    rel = "data/ST-spotfiles/A1_selection.tsv"
    monkeypatch.setitem(_registry.REGISTRY, rel, "sha256:" + "0" * 64)
    with pytest.raises(ValueError, match="(?i)hash"):
        hx.datasets.her2st("A1")
    assert not (cache / rel).exists()
    assert f"/{rel}" in requests


@pytest.mark.parametrize("kind", ["requests", "urllib", "refused"])
def test_offline_first_run_says_what_to_do(tmp_path, monkeypatch, kind):
    import urllib.error

    import pooch
    import requests

    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("HISTOEXP_DATA_DIR", str(empty))  # no local copy, an empty download cache
    monkeypatch.setattr(hx.settings, "_data_dir", None)
    if kind == "refused":  # a real failed connection, without the network: nothing listens on this port
        monkeypatch.setattr(_her2st, "_fetcher", functools.partial(_no_retry_fetcher, "http://127.0.0.1:9/"))
    else:
        err = (
            requests.exceptions.ConnectionError("Max retries exceeded with url (NameResolutionError)")
            if kind == "requests"
            else urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
        )

        def fail(self, *args, **kwargs):
            raise err

        monkeypatch.setattr(pooch.Pooch, "fetch", fail)
    with pytest.raises(ConnectionError) as info:
        hx.datasets.her2st("C2")
    msg = str(info.value)
    assert "data/ST-cnts/C2.tsv.gz" in msg and "could not download" in msg
    for hint in ("data_dir=", "HISTOEXP_DATA_DIR", "--data-dir", str(empty / "her2st")):
        assert hint in msg, hint
    base = "http://127.0.0.1:9/" if kind == "refused" else _registry.BASE_URL
    assert base + "data/ST-cnts/C2.tsv.gz" in msg  # where it tried
    assert info.value.__cause__ is None and info.value.__suppress_context__  # one error, not the chain
    assert len(msg.splitlines()) == 1


def _no_retry_fetcher(base_url, path):
    import pooch

    return pooch.create(path=path, base_url=base_url, registry=dict(_registry.REGISTRY))
