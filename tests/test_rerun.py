"""Re-running a notebook cell: histoexp replaces its own keys (as scanpy does) and never what the user made."""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pytest

import histoexp as hx
from histoexp._utils import WRITTEN, claim_key, fingerprint, mark_written, written_by


@pytest.fixture(scope="module")
def c2_small(her2st_c2):
    """40 spots of her2st C2 with 112 µm patches at 112 px (memory), handcrafted features, 3x3 windows."""
    a = her2st_c2[:40].copy()
    hx.pp.extract_patches(a, size_um=112, patch_px=112, store="memory")
    hx.tl.embed_patches(a, "handcrafted")
    hx.tl.embed_neighbourhood(a, "handcrafted", grid=3)
    return a


def test_rerun_of_each_step_replaces_its_keys_with_the_same_result(c2_small, caplog):
    a = c2_small.copy()
    patches = a.obsm["patches"].copy()
    feats, grid = a.obsm["X_handcrafted"].copy(), a.obsm["X_handcrafted_grid"].copy()
    hx.settings.verbosity = 2
    with caplog.at_level(logging.INFO, logger="histoexp"):
        hx.pp.extract_patches(a, size_um=112, patch_px=112, store="memory")
        hx.tl.embed_patches(a, "handcrafted")
        hx.tl.embed_neighbourhood(a, "handcrafted", grid=3)
    np.testing.assert_array_equal(a.obsm["patches"], patches)
    np.testing.assert_array_equal(a.obsm["X_handcrafted"], feats)
    np.testing.assert_array_equal(a.obsm["X_handcrafted_grid"], grid)
    said = caplog.text
    for what in ("obsm['patches']", "obsm['X_handcrafted']", "obsm['X_handcrafted_grid']"):
        assert f"Replacing adata.{what}" in said  # said at info level, who wrote it
    assert "written by an earlier embed_neighbourhood call" in said

    genes = list(a.var_names[np.asarray(a.X.sum(0)).ravel().argsort()[::-1][:30]])
    hx.tl.fit_ridge(a, genes=genes, use_rep="X_handcrafted")
    first = dict(a.uns["ridge"]["params"])
    hx.tl.fit_ridge(a, genes=genes, use_rep="X_handcrafted")
    assert a.uns["ridge"]["params"]["alpha"] == first["alpha"]

    kw = {"genes": genes, "use_rep": "X_handcrafted", "epochs": 3, "n_ensemble": 2, "val_fraction": 0.0}
    hx.tl.fit_bleep(a, **kw)
    emb = a.obsm["X_bleep_image"].copy()
    hx.tl.fit_bleep(a, **kw)  # same seed, same device: the same model
    np.testing.assert_allclose(a.obsm["X_bleep_image"], emb, rtol=1e-5, atol=1e-6)

    hx.tl.spatial_domains(a, layer=None, n_pcs=5, n_spatial_neighbors=4)
    labels = a.obs["measured_domains"].copy()
    hx.tl.spatial_domains(a, layer=None, n_pcs=5, n_spatial_neighbors=4)
    assert (a.obs["measured_domains"] == labels).all()

    # every key a step wrote is recorded with who wrote it
    for attr, key, by in [
        ("obsm", "patches", "extract_patches"),
        ("histoexp", "patches", "extract_patches"),
        ("obs", "patches_outside", "extract_patches"),
        ("obsm", "X_handcrafted", "embed_patches"),
        ("obsm", "X_handcrafted_grid", "embed_neighbourhood"),
        ("uns", "ridge", "fit (ridge)"),
        ("obsm", "X_bleep_image", "fit (BLEEP)"),
        ("uns", "bleep", "fit (BLEEP)"),
        ("obs", "measured_domains", "spatial_domains"),
    ]:
        assert written_by(a, attr, key) == by


def test_user_keys_are_refused_and_unchanged(c2_small):
    a = c2_small.copy()
    mine = np.arange(a.n_obs * 4, dtype=np.float32).reshape(a.n_obs, 4)
    a.obsm["X_handcrafted"] = mine.copy()  # the user's own features under the same name
    a.obsm["X_handcrafted_grid"] = mine.copy()
    a.obs["patches_outside"] = 0.5
    a.uns["ridge"] = {"params": {"alpha": "mine"}}
    for call in (
        lambda: hx.tl.embed_patches(a, "handcrafted"),
        lambda: hx.tl.embed_neighbourhood(a, "handcrafted", grid=3),
        lambda: hx.pp.extract_patches(a, size_um=112, patch_px=112),
        lambda: hx.tl.fit_ridge(a, genes=list(a.var_names[:5]), use_rep="X_handcrafted"),
    ):
        with pytest.raises(KeyError, match="overwrite=True"):
            call()
    np.testing.assert_array_equal(a.obsm["X_handcrafted"], mine)
    np.testing.assert_array_equal(a.obsm["X_handcrafted_grid"], mine)
    assert (a.obs["patches_outside"] == 0.5).all() and a.uns["ridge"] == {"params": {"alpha": "mine"}}
    # a key the user made without any record says so; one changed after histoexp wrote it says that
    b = c2_small.copy()
    b.obsm["X_other"] = mine
    with pytest.raises(KeyError, match=r"obsm\['X_other'\] already exists and was not written by histoexp"):
        hx.tl.embed_patches(b, "handcrafted", key_added="X_other")
    with pytest.raises(KeyError, match="changed since histoexp wrote it"):
        hx.tl.embed_patches(c2_small[:20].copy(), "handcrafted")  # a subset: other rows than histoexp wrote
    hx.tl.embed_patches(b, "handcrafted", key_added="X_other", overwrite=True)  # the explicit remedy
    np.testing.assert_array_equal(b.obsm["X_other"], c2_small.obsm["X_handcrafted"])


def test_records_survive_h5ad(c2_small, tmp_path):
    a = c2_small.copy()
    hx.tl.fit_ridge(a, genes=list(a.var_names[:20]), use_rep="X_handcrafted")
    hx.tl.spatial_domains(a, layer=None, n_pcs=5, n_spatial_neighbors=4)
    path = tmp_path / "a.h5ad"
    a.write_h5ad(path)
    b = ad.read_h5ad(path)
    for attr, key in [
        ("obsm", "patches"),
        ("histoexp", "patches"),
        ("obsm", "X_handcrafted"),
        ("uns", "ridge"),
        ("obs", "measured_domains"),
        ("uns", "measured_domains"),
    ]:
        assert written_by(b, attr, key) == written_by(a, attr, key) is not None
    hx.tl.embed_patches(b, "handcrafted")  # the re-run after reading the file
    hx.tl.fit_ridge(b, genes=list(a.var_names[:20]), use_rep="X_handcrafted")
    assert set(b.uns["histoexp"][WRITTEN]) >= {"obsm", "obs", "uns", "histoexp"}


def test_zarr_store_is_replaced_on_rerun_only_at_its_own_path(her2st_c2, tmp_path):
    from histoexp import _fs

    a = her2st_c2[:12].copy()
    store = tmp_path / "p.zarr"
    hx.pp.extract_patches(a, size_um=112, patch_px=64, store="zarr", path=store)
    first = hx.pp.get_patches(a).batch(np.arange(a.n_obs))
    hx.pp.extract_patches(a, size_um=112, patch_px=32, store="zarr", path=store)  # re-run: the same store
    assert _fs.is_ours(store, "patches") and hx.pp.get_patches(a).patch_px == 32
    other = tmp_path / "elsewhere.zarr"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="`path`"):  # a folder histoexp did not make, never replaced
        hx.pp.extract_patches(a, size_um=112, patch_px=64, store="zarr", path=other)
    assert (other / "notes.txt").read_text() == "mine"
    hx.pp.extract_patches(a, size_um=112, patch_px=64, store="zarr", path=store)
    np.testing.assert_array_equal(hx.pp.get_patches(a).batch(np.arange(a.n_obs)), first)


def test_fingerprint_and_claim_rules():
    a = ad.AnnData(np.zeros((4, 2), np.float32))
    a.obsm["X"] = np.arange(8.0).reshape(4, 2)
    assert not claim_key(a, "obsm", "new", overwrite=False)  # absent: free
    with pytest.raises(KeyError, match="not written by histoexp"):
        claim_key(a, "obsm", "X", overwrite=False)
    assert claim_key(a, "obsm", "X", overwrite=True)
    mark_written(a, "obsm", "X", by="test")
    assert claim_key(a, "obsm", "X", overwrite=False)
    a.obsm["X"][0, 0] = 99.0  # edited in place
    with pytest.raises(KeyError, match="changed since"):
        claim_key(a, "obsm", "X", overwrite=False)
    # equal contents, other layout: the same fingerprint; other values or dtype: another
    x = np.arange(12.0).reshape(3, 4)
    assert fingerprint(np.asfortranarray(x)) == fingerprint(x) != fingerprint(x.astype(np.float32))
    assert fingerprint({"a": [1, 2.5], "b": (True, "s")}) == fingerprint(
        {"b": np.array([True, "s"], dtype=object), "a": np.array([1.0, 2.5])}
    )
    assert fingerprint(np.array(["a", "b"], dtype=object)) is None  # not hashable here: never taken for ours
