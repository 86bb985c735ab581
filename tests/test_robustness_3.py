"""Reliability, round 3 (issue 22): the new surfaces (NH2ST queries, many slides, resume, geometry).

Each test reproduces one case of the issue, on the real her2st sections where the issue did (C2 for training, C3
and C4 as queries: small subsets, the training-free 'handcrafted' encoder on 16 px patches), and asserts the fixed
behaviour; refusals compare the user's files (sha256 of every file) or objects before and after.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from _helpers import snapshot

import histoexp as hx
from histoexp.cli import main

SRC = str(Path(hx.__file__).resolve().parents[1])
PX = 16  # patch side of the training features
N_GENES = 20


def state(a: ad.AnnData) -> tuple:
    """What a refused call must leave unchanged in an AnnData: its keys and the bytes of its obsm arrays."""
    obsm = {k: hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest() for k, v in a.obsm.items()}
    return sorted(a.uns.keys()), json.dumps(a.uns.get("histoexp", {}), sort_keys=True, default=str), obsm


def prep(a: ad.AnnData, *, patch_px: int = PX, size_um: float | None = None, windows: bool = True) -> ad.AnnData:
    """Patches, handcrafted spot features and (``windows``) their 3 x 3 neighbourhood windows."""
    a = a.copy()
    hx.pp.extract_patches(a, patch_px=patch_px, size_um=size_um, store="memory")
    hx.tl.embed_patches(a, "handcrafted", weights=None)
    if windows:
        hx.tl.embed_neighbourhood(a, "handcrafted", grid=3, weights=None)
    return a


@pytest.fixture(scope="module")
def raw(her2st_dir):
    """C2 (60 spots), C3 and C4 (30 spots each) of her2st, as read (no patches yet)."""
    out = {}
    for sec, n in (("C2", 60), ("C3", 30), ("C4", 30)):
        a = hx.datasets.her2st(sec, data_dir=her2st_dir)
        out[sec] = a[np.linspace(0, a.n_obs - 1, n).astype(int)].copy()
    return out


@pytest.fixture(scope="module")
def genes(raw):
    counts = np.asarray(raw["C2"].X.sum(0)).ravel()
    return [raw["C2"].var_names[i] for i in np.argsort(-counts)[:N_GENES]]


@pytest.fixture(scope="module")
def real(raw):
    old = hx.settings.progress
    hx.settings.progress = False
    out = {sec: prep(a) for sec, a in raw.items()}
    hx.settings.progress = old
    return out


def _table(genes, seed=3):
    return pd.DataFrame(np.random.default_rng(seed).normal(size=(len(genes), 6)), index=list(genes))


FIT = {
    "ridge": lambda a, g: hx.tl.fit_ridge(a, genes=g, use_rep="X_handcrafted"),
    "bleep": lambda a, g: hx.tl.fit_bleep(
        a, genes=g, use_rep="X_handcrafted", epochs=1, n_ensemble=1, batch_size=16, projection_dim=8
    ),
    "mclstexp": lambda a, g: hx.tl.fit_mclstexp(
        a,
        genes=g,
        use_rep="X_handcrafted",
        epochs=1,
        n_ensemble=1,
        batch_size=16,
        projection_dim=8,
        n_layers=1,
        n_heads=1,
        head_dim=8,
    ),
    "zeroshot": lambda a, g: hx.tl.fit_zeroshot(
        a, gene_embeddings=_table(g), genes=g, use_rep="X_handcrafted", method="neural", epochs=1, dim=8, batch_size=16
    ),
    "nh2st": lambda a, g: hx.tl.fit_nh2st(
        a, genes=g, use_rep="X_handcrafted", epochs=1, n_ensemble=1, dim=8, heads=1, batch_size=16
    ),
}


@pytest.fixture(scope="module")
def models(real, genes):
    """One model of every kind, trained on C2's features (16 px patches of the spot diameter)."""
    old = hx.settings.progress
    hx.settings.progress = False
    out = {name: fit(real["C2"].copy(), genes) for name, fit in FIT.items()}
    hx.settings.progress = old
    return out


# --------------------------------------------------------------------------------------------- (1) geometry tolerance
def test_geometry_is_compared_with_a_tolerance():
    from histoexp._geometry import record_differences, same_size

    assert same_size(100.0, 99.99999999999999) and same_size(64, 64.0)
    assert not same_size(100, 200) and not same_size(32, 64)
    found = {"encoder": "handcrafted", "grid": 3, "window_um": 99.99999999999999, "patch_px": 16}
    assert record_differences(found, {**found, "window_um": 100.0, "grid": 3.0}) == []
    assert [d[0] for d in record_differences(found, {**found, "patch_px": 32, "encoder": "x"})] == [
        "encoder",
        "patch_px",
    ]
    assert record_differences(None, found) == [] and record_differences(found, {}) == []


def test_nh2st_predicts_c4_after_fit_on_c2(raw, models):
    """C4's spot diameter is 99.99999999999999 µm, C2's 100.0: the same geometry (the issue's case)."""
    m = models["nh2st"]
    c4 = raw["C4"].copy()
    hx.pp.extract_patches(c4, patch_px=PX, store="memory")
    assert c4.uns["histoexp"]["patches"]["size_um"] != m.config["embedding"]["size_um"]  # they differ as floats
    assert hx.tl.embed_query(c4, m) == ["X_handcrafted", "X_handcrafted_grid"]
    pred = hx.tl.impute(c4, m)
    assert pred.layers["nh2st"].shape == (c4.n_obs, N_GENES) and np.isfinite(pred.layers["nh2st"]).all()
    assert hx.tl.embed_query(c4, m) == []  # present and matching: kept


# --------------------------------------------------------------------------------------------- (2) query geometry
@pytest.fixture(scope="module")
def wrong_geometry(raw):
    """C3 embedded from 32 px patches (same µm) and from 200 µm patches (same px): not what the models saw."""
    old = hx.settings.progress
    hx.settings.progress = False
    out = {"32 px": prep(raw["C3"], patch_px=2 * PX), "200 µm": prep(raw["C3"], size_um=200.0)}
    hx.settings.progress = old
    return out


@pytest.mark.parametrize("kind", list(FIT))
@pytest.mark.parametrize("case", ["32 px", "200 µm"])
def test_query_of_another_geometry_is_refused_for_every_model(models, wrong_geometry, real, kind, case):
    model, query = models[kind], wrong_geometry[case].copy()
    before = state(query)
    field = "patch_px" if case == "32 px" else "size_um"
    with pytest.raises(ValueError, match=rf"{field}=.*\(model: .*extract_patches\(query, size_um="):
        hx.tl.impute(query, model)
    with pytest.raises(ValueError, match=field):  # embed_query keeps nothing that differs silently either
        hx.tl.embed_query(query, model)
    assert state(query) == before
    # features from the training geometry predict; the right patches, then embed_query(overwrite=True), too
    assert np.isfinite(hx.tl.impute(real["C3"], model).layers[model.method]).all()
    with pytest.raises(ValueError, match="patches.*differ"):  # the patches themselves are the wrong ones
        hx.tl.embed_query(query, model, overwrite=True)
    spec = model.image_spec()
    hx.pp.extract_patches(query, size_um=spec["size_um"], patch_px=spec["patch_px"], overwrite=True, store="memory")
    assert "X_handcrafted" in hx.tl.embed_query(query, model, overwrite=True)
    pred = hx.tl.impute(query, model).layers[model.method]
    assert pred.shape == (query.n_obs, N_GENES) and np.isfinite(pred).all()


def test_cli_fit_refuses_references_of_different_geometries(raw, tmp_path, capsys):
    paths = [tmp_path / "c2.h5ad", tmp_path / "c3.h5ad"]
    raw["C2"].write_h5ad(paths[0])
    c3 = raw["C3"].copy()
    hx.pp.extract_patches(c3, patch_px=PX, size_um=200.0, store="memory")  # wider patches, kept in the file
    c3.write_h5ad(paths[1])
    args = ["fit", *map(str, paths), "-o", str(tmp_path / "m"), "--method", "ridge", "--patch-px", str(PX), "-q"]
    assert main([*args, "--genes", "all"]) == 1
    err = capsys.readouterr().err
    assert "another geometry" in err and "size_um=200" in err and not (tmp_path / "m").exists()


def test_finetuned_query_patches_of_another_geometry_are_refused(tmp_path):
    a = hx.datasets.synthetic(n_sections=2, n_side=6, random_state=1)
    hx.pp.extract_patches(a, size_um=64, patch_px=32)
    kw = {"genes": "all", "encoder": "resnet18", "weights": None, "encoder_kwargs": {"transform": {"input_size": 32}}}
    model = hx.tl.fit_bleep(a, finetune_encoder=True, epochs=1, batch_size=16, **kw)  # end to end
    q = a.copy()
    hx.pp.extract_patches(q, size_um=64, patch_px=16, overwrite=True)
    with pytest.raises(ValueError, match=r"patch_px=16 \(model: 32\).*extract_patches"):
        hx.tl.impute(q, model)
    assert np.isfinite(hx.tl.impute(a, model).layers["bleep"]).all()


# --------------------------------------------------------------------------------------------- (3) images per section
def test_spots_are_never_cut_from_another_sections_image(raw):
    cat = ad.concat([raw["C2"], raw["C3"]], index_unique=None)
    cat.uns["spatial"] = {"C2": raw["C2"].uns["spatial"]["C2"]}  # C3's image entry deleted
    before = state(cat)
    with pytest.raises(ValueError, match=r"Sections \['C3'\].*no image.*another section's image"):
        hx.pp.extract_patches(cat, patch_px=PX)
    assert state(cat) == before and "patches" not in cat.obsm
    # one section whose only image is another section's: refused, unless the user says it is its own
    c3 = raw["C3"].copy()
    c3.uns["spatial"] = {"C2": raw["C2"].uns["spatial"]["C2"]}
    with pytest.raises(ValueError, match="library_id='C2'"):
        hx.pp.extract_patches(c3, patch_px=PX)
    assert "histoexp" not in c3.uns
    # with C3's own image given, both sections are read from their own images
    path = raw["C3"].uns["spatial"]["C3"]["metadata"]["source_image_path"]
    img = {"C3": hx.image.SlideImage.open(path, mpp=raw_mpp(raw, "C3"))}
    hx.pp.extract_patches(cat, patch_px=PX, size_um=100.0, image=img)
    assert cat.uns["histoexp"]["patches"]["libraries"]["C3"]["image"] == str(Path(path).resolve())


def raw_mpp(raw, sec):
    return float(raw[sec].uns["spatial"][sec]["scalefactors"]["microns_per_pixel"])


# --------------------------------------------------------------------------------------------- (4) many slides
@pytest.fixture(scope="module")
def crop(raw, tmp_path_factory):
    """A 1400 x 1400 px crop of C2's H&E (real tissue) as a PNG, and C2's µm/px."""
    from PIL import Image

    path = raw["C2"].uns["spatial"]["C2"]["metadata"]["source_image_path"]
    cx, cy = np.median(raw["C2"].obsm["spatial"], axis=0).astype(int)
    out = tmp_path_factory.mktemp("crop") / "c2crop.png"
    with Image.open(path) as im:
        im.crop((cx - 700, cy - 700, cx + 700, cy + 700)).save(out)
    return out, raw_mpp(raw, "C2")


def _csv(tmp_path, path, mpp, name="slides.csv"):
    csv = tmp_path / name
    pd.DataFrame([{"slide_id": "c2crop", "path": str(path), "mpp": mpp}]).to_csv(csv, index=False)
    return csv


def test_impute_slides_recomputes_a_slide_whose_manifest_row_changed(crop, models, tmp_path):
    path, mpp = crop
    out = tmp_path / "out"
    r1 = hx.tl.impute_slides(_csv(tmp_path, path, 1.0), models["ridge"], out)  # a wrong µm/px first
    assert r1.loc["c2crop", "status"] == "done"
    r2 = hx.tl.impute_slides(_csv(tmp_path, path, mpp), models["ridge"], out)  # corrected in the manifest
    assert r2.loc["c2crop", "status"] == "done"  # computed again, not "skipped" with the stale output
    assert r2.loc["c2crop", "n_tiles"] < r1.loc["c2crop", "n_tiles"]  # 100 µm tiles are wider at the right µm/px
    assert ad.read_h5ad(out / "c2crop.h5ad").n_obs == r2.loc["c2crop", "n_tiles"]
    rec = json.loads((out / "c2crop.done.json").read_text())
    assert rec["inputs"]["mpp"] == pytest.approx(mpp) and rec["inputs"]["path"] == str(path)
    r3 = hx.tl.impute_slides(_csv(tmp_path, path, mpp), models["ridge"], out)
    assert r3.loc["c2crop", "status"] == "skipped"


def test_impute_slides_bad_run_record_is_refused_not_ignored(crop, models, tmp_path):
    path, mpp = crop
    csv = _csv(tmp_path, path, mpp)
    out = tmp_path / "out"
    hx.tl.impute_slides(csv, models["ridge"], out)
    record = out / "histoexp_slides.json"
    record.write_text(record.read_text()[:40])  # truncated
    before = snapshot(out)
    for model in (models["ridge"], models["bleep"]):  # the same model, and another one (would mix the folder)
        for overwrite in (False, True):
            with pytest.raises(ValueError, match="not a run record of impute_slides"):
                hx.tl.impute_slides(csv, model, out, overwrite=overwrite)
    assert snapshot(out) == before
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "histoexp_slides.json").write_text('{"note": "my own file"}')
    before = snapshot(foreign)
    with pytest.raises(ValueError, match="not a run record"):
        hx.tl.impute_slides(csv, models["ridge"], foreign, overwrite=True)
    assert snapshot(foreign) == before


def test_impute_slides_never_touches_the_users_records(crop, models, tmp_path):
    path, mpp = crop
    csv = _csv(tmp_path, path, mpp)
    out = tmp_path / "out"
    out.mkdir()
    (out / "c2crop.failed.json").write_text('{"my": "notes on why this slide failed last year"}')
    res = hx.tl.impute_slides(csv, models["ridge"], out)
    assert res.loc["c2crop", "status"] == "done"
    assert json.loads((out / "c2crop.failed.json").read_text()) == {"my": "notes on why this slide failed last year"}
    out2 = tmp_path / "out2"
    out2.mkdir()
    (out2 / "c2crop.done.json").write_text('{"my": "record"}')
    before = snapshot(out2)
    res = hx.tl.impute_slides(csv, models["ridge"], out2)
    assert res.loc["c2crop", "status"] == "failed" and "not written by impute_slides" in res.loc["c2crop", "error"]
    after = snapshot(out2)
    assert after["c2crop.done.json"] == before["c2crop.done.json"] and "c2crop.h5ad" not in after


def test_predictions_are_never_written_into_the_model_folder(crop, models, tmp_path, capsys):
    path, mpp = crop
    model_dir = tmp_path / "model"
    models["ridge"].save(model_dir)
    csv = _csv(tmp_path, path, mpp)
    before = snapshot(model_dir)
    for out in (model_dir, model_dir / "predictions"):
        assert main(["impute", str(model_dir), str(csv), "-o", str(out), "-q"]) == 1
        assert "MODEL_DIR" in capsys.readouterr().err
        with pytest.raises(ValueError, match="model folder"):
            hx.tl.impute_slides(csv, str(model_dir), out)
    assert snapshot(model_dir) == before


# --------------------------------------------------------------------------------------------- (5) resume settings
@pytest.fixture(scope="module")
def synth_feat():
    a = hx.datasets.synthetic(n_sections=2, n_side=6, random_state=0)
    hx.pp.extract_patches(a, patch_px=8, store="memory")
    hx.tl.embed_patches(a, "handcrafted", weights=None, key_added="X_f")  # NH2ST needs a window record
    hx.tl.embed_neighbourhood(a, "handcrafted", grid=3, weights=None, key_added="X_f_grid")
    return a


RESUME = {
    "bleep": (hx.tl.fit_bleep, {"temperature": 1.0}, {"temperature": 0.5}),
    "mclstexp": (hx.tl.fit_mclstexp, {"image_weight": 0.5, "n_layers": 1, "head_dim": 8}, {"image_weight": 0.9}),
    "nh2st": (hx.tl.fit_nh2st, {"contrastive": True, "dim": 8, "heads": 1}, {"contrastive": False}),
    "zeroshot": (hx.tl.fit_zeroshot, {"method": "neural", "pcc_weight": 0.5, "dim": 8}, {"pcc_weight": 0.0}),
}


@pytest.mark.parametrize("method", list(RESUME))
def test_resume_refuses_a_checkpoint_of_other_model_settings(synth_feat, method, tmp_path):
    fit, base, changed = RESUME[method]
    kw = {"genes": "all", "use_rep": "X_f", "n_ensemble": 1, "checkpoint_dir": tmp_path / "ck", **base}
    if method == "zeroshot":
        kw["gene_embeddings"] = _table(synth_feat.var_names)
    fit(synth_feat.copy(), epochs=1, **kw)
    before = snapshot(tmp_path / "ck")
    name = next(iter(changed))
    with pytest.raises(ValueError, match=rf"settings differ.*{name}"):
        fit(synth_feat.copy(), epochs=2, resume=True, **{**kw, **changed})
    assert snapshot(tmp_path / "ck") == before
    model = fit(synth_feat.copy(), epochs=2, resume=True, **kw)  # the same settings continue
    assert model.config["history"]["epochs_run"] == 2


# --------------------------------------------------------------------------------------------- (6) CLI retrieval
def test_cli_impute_uses_the_models_retrieval_defaults(her2st_c2, raw, tmp_path, capsys):
    ref = prep(her2st_c2[:250].copy(), windows=False)
    model = hx.tl.fit_mclstexp(
        ref, genes=list(ref.var_names[:20]), use_rep="X_handcrafted", epochs=1, n_ensemble=1, projection_dim=8
    )
    model.save(tmp_path / "model")
    query = tmp_path / "c3.h5ad"
    raw["C3"].write_h5ad(query)
    args = ["impute", str(tmp_path / "model"), str(query), "-q", "--n-maps", "0"]
    assert main([*args, "-o", str(tmp_path / "a")]) == 0
    params = ad.read_h5ad(tmp_path / "a" / "predictions.h5ad").uns["mclstexp"]["params"]
    assert ref.n_obs > 50 and params["n_reference"] == ref.n_obs  # C2 has 187 spots: k is clipped to them
    assert params["method"] == "inverse_distance" and params["k"] == min(200, ref.n_obs)  # mclSTExp's, not 50/average
    for method in ("inverse_distance", "inverse_distance_l2", "weighted"):
        assert main([*args, "-o", str(tmp_path / method), "--method", method, "--k", "7"]) == 0
        params = ad.read_h5ad(tmp_path / method / "predictions.h5ad").uns["mclstexp"]["params"]
        assert params["method"] == method and params["k"] == 7
    capsys.readouterr()
    assert main([*args, "-o", str(tmp_path / "b"), "--method", "nearest"]) == 1
    assert "--method 'nearest'" in capsys.readouterr().err and not (tmp_path / "b").exists()


def test_cli_retrieval_options_refused_for_a_regression_model(models, raw, tmp_path, capsys):
    models["ridge"].save(tmp_path / "model")
    query = tmp_path / "c3.h5ad"
    raw["C3"].write_h5ad(query)
    assert main(["impute", str(tmp_path / "model"), str(query), "-o", str(tmp_path / "o"), "-q", "--k", "5"]) == 1
    assert "--k apply to retrieval models" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- (7) small sections
def test_single_spot_section_does_not_break_ridges_inner_cv(real, genes):
    import torch
    from sklearn.linear_model import RidgeCV

    one_more = ad.concat([real["C2"], real["C3"], real["C4"][:1]], index_unique=None)  # C4: a single spot
    m = hx.tl.fit_ridge(one_more, genes=genes, use_rep="X_handcrafted")
    assert "['C4'] (< 10 spots even together) never held out" in one_more.uns["ridge"]["params"]["alpha_cv"]
    # the penalty is the one leave-one-section-out over C2 and C3 chooses, the C4 spot on the training side of both
    # folds (before: every fold's score was NaN, as C4 alone has no R², and alpha fell to the smallest, 0.1)
    with torch.no_grad():
        z = m.net.features(torch.as_tensor(one_more.obsm["X_handcrafted"])).double().numpy()
    y = hx.pp.expression_matrix(one_more, genes)
    lib = one_more.obs["library_id"].astype(str).to_numpy()
    folds = [(np.flatnonzero(lib != s), np.flatnonzero(lib == s)) for s in ("C2", "C3")]
    want = RidgeCV(alphas=hx.tl._ridge.ALPHAS, cv=folds).fit(z, y)
    assert np.isfinite(want.best_score_) and m.config["alpha"] == want.alpha_ != min(hx.tl._ridge.ALPHAS)
    two = ad.concat([real["C2"], real["C3"]], index_unique=None)
    hx.tl.fit_ridge(two, genes=genes, use_rep="X_handcrafted")
    assert two.uns["ridge"]["params"]["alpha_cv"] == "leave-one-section-out"  # unchanged without small sections


def test_leave_one_section_out_policy():
    from histoexp._cv import leave_one_section_out

    g = np.array(["a"] * 12 + ["b"] * 15 + ["c"] * 4 + ["d"] * 7)
    s = leave_one_section_out(g)
    assert s.held_out == ["a", "b", "pooled:c+d"] and s.pooled == ["c", "d"] and not s.train_only
    for train, test in s.folds:
        assert len(test) >= 10 and not set(train) & set(test) and len(train) + len(test) == len(g)
    s = leave_one_section_out(g[:28])  # c: one spot, never held out, always trained on
    assert s.held_out == ["a", "b"] and s.train_only == ["c"] and all(27 in tr for tr, _ in s.folds)
    assert leave_one_section_out(g[:13]).folds is None  # one usable section: no leave-one-section-out


# --------------------------------------------------------------------------------------------- (8) sizes bounded
def _png_header(w: int, h: int) -> bytes:
    """A PNG that declares w x h RGB pixels (IHDR) and holds almost nothing: a decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_decoded_image_size_is_capped_up_front(crop, tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header(20000, 20000))
    with pytest.raises(ValueError, match=r"20000 x 20000 px.*max_image_pixels"):
        hx.image.SlideImage.open(bomb)
    with pytest.raises(ValueError, match="max_image_pixels"):
        hx.pp.tile_tissue(bomb, mpp=0.5)
    path, mpp = crop
    old = hx.settings.max_image_pixels
    try:
        hx.settings.max_image_pixels = 1000 * 1000  # the override works both ways
        with pytest.raises(ValueError, match="1400 x 1400"):
            hx.image.SlideImage.open(path)
        hx.settings.max_image_pixels = None
        assert hx.image.SlideImage.open(path).shape == (1400, 1400)
        with pytest.raises(ValueError, match="max_image_pixels"):
            hx.settings.max_image_pixels = 0
    finally:
        hx.settings.max_image_pixels = old


def test_nonsense_mpp_tiles_are_refused(crop, models, tmp_path):
    path, _ = crop
    for mpp in (40, 100):  # 2.5 and 1 px tiles: millions of them
        with pytest.raises(ValueError, match=rf"`mpp={mpp}`.*below 8 px"):
            hx.pp.tile_tissue(path, mpp=mpp)
    res = hx.tl.impute_slides(_csv(tmp_path, path, 40.0), models["ridge"], tmp_path / "out")
    assert res.loc["c2crop", "status"] == "failed" and "`mpp=40`" in res.loc["c2crop", "error"]


# --------------------------------------------------------------------------------------------- (9) model integrity
def _visible_copy(src: Path, dst: Path) -> Path:
    """``cp src/* dst/``: the hidden marker stays behind."""
    dst.mkdir()
    for f in src.iterdir():
        if not f.name.startswith("."):
            shutil.copy(f, dst / f.name)
    return dst


def test_edited_config_is_detected_without_the_hidden_marker(models, tmp_path):
    models["ridge"].save(tmp_path / "m")
    copy = _visible_copy(tmp_path / "m", tmp_path / "copy")
    assert not (copy / ".histoexp.json").exists() and hx.tl.load_model(copy).genes == models["ridge"].genes
    cfg = json.loads((copy / "config.json").read_text())
    swapped = dict(cfg, genes=[cfg["genes"][1], cfg["genes"][0], *cfg["genes"][2:]])
    for edited, what in ((swapped, "genes swapped"), (dict(cfg, method="bleep"), "relabelled")):
        (copy / "config.json").write_text(json.dumps(edited))
        before = snapshot(copy)
        with pytest.raises(ValueError, match="differs from the config saved with the weights"):
            hx.tl.load_model(copy)
        assert snapshot(copy) == before, what


def test_old_folder_without_digest_still_gets_clear_errors(models, tmp_path):
    """A folder of an older histoexp (no digest in the weights): a bad config still fails clearly, not deep inside."""
    from safetensors.torch import load_file, save_file

    models["ridge"].save(tmp_path / "m")
    folder = _visible_copy(tmp_path / "m", tmp_path / "old")
    weights = folder / "model.safetensors"
    save_file(load_file(weights), weights)  # no metadata, as before
    cfg = json.loads((folder / "config.json").read_text())
    cfg["sha256"]["model.safetensors"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    for edit, match in (
        ({"n_ensemble": "two"}, "'n_ensemble' is 'two'"),
        ({"method": "bleep"}, "not describe a 'bleep'"),
    ):
        (folder / "config.json").write_text(json.dumps({**cfg, **edit}))
        with pytest.raises(ValueError, match=match):
            hx.tl.load_model(folder)


# --------------------------------------------------------------------------------------------- (11) interrupted save
def test_interrupted_save_is_explained_and_cleaned_up(models, tmp_path):
    from histoexp._fs import STALE_TMP_SECONDS

    target = tmp_path / "model"
    models["ridge"].save(tmp_path / "previous")
    models["bleep"].save(tmp_path / "new")
    # what a save killed between its two renames leaves: the old folder and the new, complete one, both hidden
    old, new = tmp_path / ".model.old-0123abcd", tmp_path / ".model.tmp-4567cdef"
    (tmp_path / "previous").rename(old)
    (tmp_path / "new").rename(new)
    partial = tmp_path / ".model.tmp-89abcdef"  # a save killed while building, long ago
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half")
    os.utime(partial, (time.time() - 2 * STALE_TMP_SECONDS,) * 2)
    recent = tmp_path / ".model.tmp-fedcba98"  # being written now by another process, perhaps
    recent.mkdir()
    (recent / "model.safetensors").write_bytes(b"half")
    mine = tmp_path / ".model.tmp-notes"  # not histoexp's naming
    mine.mkdir()
    with pytest.raises(
        FileNotFoundError, match=r"previous model is at .*\.model\.old-0123abcd.*complete.*tmp-4567cdef"
    ):
        hx.tl.load_model(target)
    assert hx.tl.load_model(old).method == "ridge" and hx.tl.load_model(new).method == "bleep"
    models["ridge"].save(target)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".model")) == [
        ".model.tmp-fedcba98",
        ".model.tmp-notes",
    ]


# --------------------------------------------------------------------------------------------- (12) one training
def test_second_training_on_a_checkpoint_folder_is_refused_up_front(synth_feat, tmp_path):
    ckpt = tmp_path / "ck"
    code = (
        "import sys, time; from histoexp._lock import folder_lock\n"
        f"with folder_lock({str(ckpt)!r}):\n    print('ready', flush=True); time.sleep(120)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": SRC}
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        before = snapshot(ckpt)
        kw = {"genes": "all", "use_rep": "X_f", "epochs": 1, "n_ensemble": 1, "checkpoint_dir": ckpt}
        with pytest.raises(FileExistsError, match=rf"in use by another training \(pid {holder.pid}"):
            hx.tl.fit_bleep(synth_feat.copy(), **kw)
        with pytest.raises(FileExistsError, match="in use"):
            hx.tl.fit_bleep(synth_feat.copy(), resume=True, **kw)
        assert snapshot(ckpt) == before  # nothing written: refused before any training
    finally:
        holder.kill()  # like a crash: the lock file stays, unlocked
        holder.wait()
    assert (ckpt / "training.lock").exists()
    model = hx.tl.fit_bleep(synth_feat.copy(), **kw)  # the stale lock is taken over
    assert model.config["history"]["epochs_run"] == 1 and not (ckpt / "training.lock").exists()


# --------------------------------------------------------------------------------------------- (13) gene tables
def test_gene_embedding_tables_read_safely(tmp_path):
    ok = tmp_path / "ok.csv"
    ok.write_text("gene,0,1\nERBB2,0.1,0.2\nGNAS,0.3,0.4\nACTB,0.5,0.25\n")  # integer column names: a header
    df = hx.pp.gene_embeddings(ok, genes=["ERBB2", "ACTB", "ERBB2"])
    assert list(df.index) == ["ERBB2", "ACTB"]  # a repeated gene once
    cases = {
        "headerless.csv": ("ERBB2,0.1,0.2\nGNAS,0.3,0.4\nACTB,0.5,0.25\n", "looks like data, not a header"),
        "numbers.csv": ("g,a,b\n1.5,0.1,0.2\n2.5,0.3,0.4\n", "gene names of the table are numbers"),
        "nan.csv": ("gene,a,b\nERBB2,0.1,0.2\n,0.3,0.4\nACTB,0.5,0.25\n", "no gene name"),
    }
    for name, (text, match) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=match):
            hx.pp.gene_embeddings(tmp_path / name)
    with pytest.raises(ValueError, match="are numbers"):  # a DataFrame whose index was never set to the genes
        hx.pp.gene_embeddings(pd.DataFrame(np.ones((3, 2))), method="table")


# --------------------------------------------------------------------------------------------- (14) clear errors
def test_unclear_errors_are_clear(models, real, genes, tmp_path):
    q = real["C3"]
    with pytest.raises(ValueError, match="`k` must be an integer >= 1"):
        hx.tl.impute(q, models["bleep"], k=True)
    with pytest.raises(ValueError, match=r"index_params\['nlist'\]=500.*larger than the reference \(60 spots\)"):
        hx.tl.impute(q, models["bleep"], index="faiss-ivf", index_params={"nlist": 500})
    with pytest.raises(KeyError, match="not among its 20 training genes"):
        hx.tl.impute(q, models["nh2st"], genes=["ERBB2" if "ERBB2" not in genes else "NOT_A_GENE"])
    bad = ad.concat([real["C2"], real["C3"]], index_unique=None, uns_merge="first")
    bad.obsm["spatial"] = bad.obsm["spatial"].astype(float)
    bad.obsm["spatial"][4, 1] = np.nan  # validation by section: only the neighbours need positions
    with pytest.raises(ValueError, match=r"NaN or infinite positions for 1 spots \(e.g. \['C2_"):
        FIT["nh2st"](bad, genes)
    # training genes equal up to case share one embedding: refused, not a KeyError deep inside
    two = real["C2"][:, genes[:4]].copy()
    two.var_names = [genes[0], genes[1], genes[2], genes[0].lower()]
    with pytest.raises(ValueError, match="all match the embedding of"):
        hx.tl.fit_zeroshot(two, gene_embeddings=_table(genes[:3]), genes="all", use_rep="X_handcrafted")


def test_truncated_tiff_names_its_file(tmp_path):
    import tifffile

    img = (np.random.default_rng(0).random((512, 512, 3)) * 255).astype(np.uint8)
    path = tmp_path / "slide.tif"
    tifffile.imwrite(path, img, tile=(128, 128), compression="zlib")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    slide = hx.image.SlideImage.open(path, mpp=1.0)  # the header is intact
    with pytest.raises(ValueError, match=r"cannot decode .*slide\.tif.*truncated or corrupted"):
        slide.read_patches(np.array([[400.0, 400.0]]), 64, 32)


def test_read_visium_damaged_files(tmp_path):
    src = Path(__file__).parent / "data" / "visium_1.0.0"
    for name, damage, match in (
        ("h5", lambda p: (p / "filtered_feature_bc_matrix.h5").write_text("not hdf5"), "is not an HDF5 file"),
        ("json", lambda p: (p / "spatial" / "scalefactors_json.json").write_text('{"spot_'), "is not readable JSON"),
        (
            "value",
            lambda p: (p / "spatial" / "scalefactors_json.json").write_text('{"spot_diameter_fullres": "x"}'),
            "not positive numbers",
        ),
    ):
        folder = tmp_path / name
        shutil.copytree(src, folder)
        damage(folder)
        with pytest.raises(ValueError, match=match):
            hx.io.read_visium(folder)
