"""The method platform: a toy plug-in, ridge, the prediction contract, scanpy use, storable keys."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import histoexp as hx
from histoexp.models.base import MODELS, RegressionModel, RetrievalModel, register_model
from histoexp.models.heads import FeatureInput
from histoexp.tl._fit import prepare_fit, train_members, write_fit_keys
from histoexp.train import SpotDataset, infer


# ---------------------------------------------------------------------------------------------- a toy plug-in
class ToyNet(nn.Module):
    def __init__(self, feature_dim: int, n_genes: int) -> None:
        super().__init__()
        self.features = FeatureInput(feature_dim)
        self.linear = nn.Linear(feature_dim, n_genes)

    def predict(self, x):
        return self.linear(self.features(x))


@register_model
class ToyModel(RegressionModel):
    method = "toy_linear"

    @classmethod
    def build_net(cls, config, encoder=None):
        return ToyNet(config["feature_dim"], len(config["genes"]))


def fit_toy(adata, *, use_rep, genes="all", key_added="toy", **hparams):
    defaults = {"epochs": 60, "batch_size": 32, "lr": 1e-2, "weight_decay": 0.0, "patience": 10, "n_ensemble": 1}
    data = prepare_fit(adata, method="toy", key_added=key_added, genes=genes, use_rep=use_rep,
                       defaults=(defaults, None), hparams=hparams)  # fmt: skip

    def make_net():
        net = ToyModel.build_net(data.config)
        net.features.fit(data.images[data.train_idx])
        return net

    def loss_fn(net, batch):
        return F.mse_loss(net.predict(batch["image"]), batch["expression"])

    nets, history = train_members(data, make_net, loss_fn, desc="toy")
    write_fit_keys(data, key_added, params={}, history=history)
    return ToyModel(nets, {**data.config, "history": history})


# ---------------------------------------------------------------------------------------------- fixtures
def _features(adata, rng, noise=0.3):
    """Features that carry the expression (a linear map of it plus noise), like an informative encoder."""
    expr = hx.pp.expression_matrix(adata)
    proj = np.random.default_rng(0).normal(size=(adata.n_vars, 12))
    return (expr @ proj + noise * rng.normal(size=(adata.n_obs, 12))).astype(np.float32)


@pytest.fixture(scope="module")
def split():
    adata = hx.datasets.synthetic(n_sections=3, random_state=0)
    adata.obsm["X_feat"] = _features(adata, np.random.default_rng(1))
    lib = adata.obs["library_id"].astype(str).to_numpy()
    return adata[lib != "S2"].copy(), adata[lib == "S2"].copy()


def _pcc(pred, truth):
    p, t = pred - pred.mean(0), truth - truth.mean(0)
    return np.nanmean((p * t).sum(0) / np.sqrt((p * p).sum(0) * (t * t).sum(0)))


def test_toy_plugin_trains_saves_loads_predicts(split, tmp_path):
    train, test = split
    model = fit_toy(train, use_rep="X_feat")
    assert MODELS["toy_linear"] is ToyModel and model.kind == "regression"
    assert train.uns["toy"]["params"]["n_train"] + train.uns["toy"]["params"]["n_val"] == train.n_obs
    pred = hx.tl.impute(test, model)
    hx.tl.evaluate(pred, layer="toy_linear")
    assert pred.uns["toy_linear"]["metrics"]["pcc_mean"] > 0.5
    shuffled = test.copy()
    shuffled.obsm["X_feat"] = test.obsm["X_feat"][np.random.default_rng(0).permutation(test.n_obs)]
    ctrl = hx.tl.impute(shuffled, model)
    assert _pcc(ctrl.layers["toy_linear"], pred.layers["measured"]) < 0.2
    model.save(tmp_path / "toy")
    loaded = hx.tl.load_model(tmp_path / "toy")
    assert isinstance(loaded, ToyModel)
    np.testing.assert_array_equal(hx.tl.impute(test, loaded).layers["toy_linear"], pred.layers["toy_linear"])


class CoordNet(nn.Module):
    """A retrieval network whose spot branch reads positions as well as expression (as mclSTExp's)."""

    def __init__(self, feature_dim, n_genes):
        super().__init__()
        self.image = nn.Linear(feature_dim, 8)
        self.expr, self.pos = nn.Linear(n_genes, 8), nn.Linear(2, 8)

    def encode_image(self, x):
        return self.image(x)

    def encode_reference(self, batch):
        return self.expr(batch["expression"]) + self.pos(batch["coords"] / 100)


@register_model
class CoordModel(RetrievalModel):
    method = "toy_coords"
    reference_fields = ("coords",)
    retrieval_defaults = {"k": 10, "method": "inverse_distance"}

    @classmethod
    def build_net(cls, config, encoder=None):
        return CoordNet(config["feature_dim"], len(config["genes"]))


def test_retrieval_reference_spots_carry_positions(split):
    train, test = split
    genes = list(train.var_names)
    torch.manual_seed(0)
    model = CoordModel(CoordModel.build_net({"feature_dim": 12, "genes": genes}),
                       {"genes": genes, "mode": "frozen", "use_rep": "X_feat", "feature_dim": 12})  # fmt: skip
    out = hx.tl.impute(test, model, reference=train)
    params = out.uns["toy_coords"]["params"]
    assert params["k"] == 10 and params["method"] == "inverse_distance"
    moved = train.copy()
    moved.obsm["spatial"] = moved.obsm["spatial"][::-1].copy()
    assert not np.allclose(hx.tl.impute(test, model, reference=moved).layers["toy_coords"], out.layers["toy_coords"])
    no_pos = train.copy()
    del no_pos.obsm["spatial"]
    with pytest.raises(KeyError, match="spot positions"):
        hx.tl.impute(test, model, reference=no_pos)
    with pytest.raises(ValueError, match="keeps no reference"):
        hx.tl.impute(test, model)


# ---------------------------------------------------------------------------------------------- ridge
def test_fit_ridge_learns_and_matches_sklearn(split, tmp_path):
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train, test = split
    model = hx.tl.fit_ridge(train, genes="all", use_rep="X_feat", n_pcs=8)
    assert model.kind == "regression" and model.config["n_pcs"] == 8
    params = train.uns["ridge"]["params"]
    assert params["alpha_cv"] == "leave-one-section-out" and params["alpha"] in model.config["alphas"]
    pred = hx.tl.impute(test, model)
    # the same pipeline in sklearn, at the chosen alpha
    ref = make_pipeline(StandardScaler(), PCA(8, svd_solver="full"), Ridge(alpha=params["alpha"]))
    ref.fit(train.obsm["X_feat"], hx.pp.expression_matrix(train))
    np.testing.assert_allclose(pred.layers["ridge"], ref.predict(test.obsm["X_feat"]), rtol=1e-3, atol=1e-3)
    hx.tl.evaluate(pred, layer="ridge")
    assert pred.uns["ridge"]["metrics"]["pcc_mean"] > 0.5
    model.save(tmp_path / "r")
    again = hx.tl.impute(test, tmp_path / "r")
    np.testing.assert_array_equal(again.layers["ridge"], pred.layers["ridge"])
    with pytest.raises(ValueError, match="alphas"):
        hx.tl.fit_ridge(train, genes="all", use_rep="X_feat", alphas=[-1.0], overwrite=True)
    with pytest.raises(ValueError, match="regression model"):
        hx.tl.impute(test, model, k=5)
    with pytest.raises(KeyError, match="cannot be predicted"):
        hx.tl.impute(test, model, genes=["not_a_gene"])


# ---------------------------------------------------------------------------------------------- data and loops
def test_spot_dataset_batches_and_neighbours():
    feats = np.arange(20, dtype=np.float32).reshape(10, 2)
    expr = np.arange(30, dtype=np.float32).reshape(10, 3)
    nb = np.full((10, 2), -1)
    nb[:, 0] = (np.arange(10) + 1) % 10
    ds = SpotDataset(feats, expr, coords=feats, rows=[3, 4, 5], neighbours=nb)
    batch = ds.__getitems__([0, 2])
    assert batch["index"].tolist() == [3, 5]
    assert torch.equal(batch["image"], torch.as_tensor(feats[[3, 5]]))
    assert torch.equal(batch["neighbour_image"][:, 0], torch.as_tensor(feats[[4, 6]]))
    assert torch.equal(batch["neighbour_expression"][:, 0], torch.as_tensor(expr[[4, 6]]))
    assert batch["neighbour_mask"].tolist() == [[True, False], [True, False]]
    with pytest.raises(ValueError, match="differ in length"):
        SpotDataset(feats, expr[:5])
    # the one inference loop keeps the order and the batch boundaries do not matter
    out = infer(lambda b: b["image"] * 2, feats, batch_size=3)
    np.testing.assert_array_equal(out, feats * 2)


def test_batch_sampler_hook_feeds_custom_batches():
    from histoexp.train import fit

    seen = []

    def sampler(gen, epoch):
        order = torch.randperm(8, generator=gen).tolist()
        return [sorted(order[:4]), sorted(order[4:])]

    def loss_fn(net, batch):
        seen.append(batch["index"].tolist())
        return F.mse_loss(net(batch["image"]), batch["expression"])

    ds = SpotDataset(np.ones((8, 2), np.float32), np.zeros((8, 1), np.float32))
    fit(nn.Linear(2, 1), ds, loss_fn=loss_fn, epochs=2, batch_size=4, batch_sampler=sampler, device="cpu")
    assert len(seen) == 4 and all(len(b) == 4 and b == sorted(b) for b in seen)
    assert sorted(seen[0] + seen[1]) == list(range(8))


# ---------------------------------------------------------------------------------------------- the prediction output
@pytest.fixture(scope="module")
def real_pipeline(her2st_dir):
    """The default pipeline on two real her2st sections: train on C3, predict C2 (handcrafted features)."""
    adata = hx.datasets.her2st(["C2", "C3"], data_dir=her2st_dir)
    hx.pp.extract_patches(adata, size_um=112, patch_px=64)
    hx.tl.embed_patches(adata, encoder="handcrafted")
    lib = adata.obs["library_id"].astype(str).to_numpy()
    train, query = adata[lib == "C3"].copy(), adata[lib == "C2"].copy()
    bleep = hx.tl.fit_bleep(train, genes="her2st", use_rep="X_handcrafted")
    ridge = hx.tl.fit_ridge(train, genes="her2st", use_rep="X_handcrafted")
    pred = hx.tl.impute(query, bleep)
    hx.tl.evaluate(pred, layer="bleep")
    hx.tl.spatial_domains(pred, layer="measured")
    hx.tl.spatial_domains(pred, layer="bleep", compare="measured_domains")
    rpred = hx.tl.impute(query, ridge)
    hx.tl.evaluate(rpred, layer="ridge")
    # an H&E-only query of the same slide: tiles, features, prediction without a measurement
    src = query.uns["spatial"]["C2"]["metadata"]["source_image_path"]
    tiles = hx.pp.tile_tissue(src, tile_um=200.0, mpp=query.uns["spatial"]["C2"]["scalefactors"]["microns_per_pixel"])
    hx.pp.extract_patches(tiles, size_um=112, patch_px=64)
    hx.tl.embed_patches(tiles, encoder="handcrafted")
    he = hx.tl.impute(tiles, bleep)
    return train, query, pred, rpred, he


def test_real_prediction_contract_and_scanpy(real_pipeline):
    import scanpy as sc
    import squidpy as sq

    _, query, pred, rpred, he = real_pipeline
    panel = [g for g in hx.datasets.her2st_gene_panel() if g in query.var_names]
    assert list(pred.var_names) == panel and pred.X is None
    assert not np.isnan(pred.layers["bleep"]).any() and pred.var["measured"].all()
    np.testing.assert_allclose(pred.layers["measured"], hx.pp.expression_matrix(query, panel))
    assert 0.02 < pred.uns["bleep"]["metrics"]["pcc_mean"] < 0.6
    assert 0.02 < rpred.uns["ridge"]["metrics"]["pcc_mean"] < 0.6
    assert pred.uns["bleep"]["metrics"]["truth"] == "layers['measured']"
    assert list(he.var_names) == panel and "measured" not in he.layers and he.n_obs > 50
    with pytest.raises(ValueError, match="no measurement"):
        hx.tl.evaluate(he, layer="bleep")
    # scanpy / squidpy work on the prediction layer as on any expression layer
    work = pred.copy()
    sc.pp.pca(work, layer="bleep", n_comps=10)
    assert work.obsm["X_pca"].shape == (pred.n_obs, 10)
    sc.pp.highly_variable_genes(work, layer="bleep", n_top_genes=50, flavor="seurat")
    assert work.var["highly_variable"].sum() == 50
    getattr(sq.gr, "spatial_neighbors_knn", sq.gr.spatial_neighbors)(work)
    sq.gr.spatial_autocorr(work, layer="bleep", genes=panel[:20], mode="moran", n_perms=None)
    assert work.uns["moranI"].shape[0] == 20


def _keys(adata):
    def walk(d, prefix=""):
        out = set()
        for k, v in d.items():
            out.add(prefix + k)
            if isinstance(v, dict):
                out |= walk(v, prefix + k + "/")
        return out

    return {
        "obs": set(adata.obs.columns),
        "var": set(adata.var.columns),
        "obsm": set(adata.obsm),
        "layers": set(adata.layers),
        "uns": walk(dict(adata.uns)),
    }


@pytest.mark.parametrize("fmt", ["h5ad", "zarr"])
def test_every_key_round_trips(real_pipeline, tmp_path, fmt):
    train, _, pred, rpred, he = real_pipeline
    for name, obj in (("train", train), ("pred", pred), ("ridge", rpred), ("he", he)):
        path = tmp_path / f"{name}.{fmt}"
        if fmt == "h5ad":
            obj.write_h5ad(path)
            back = ad.read_h5ad(path)
        else:
            obj.write_zarr(path)
            back = ad.read_zarr(path)
        assert _keys(back) == _keys(obj), name
        if name == "train":  # the default ensemble's per-member histories survive
            assert back.uns["bleep"]["history"]["members"]["4"]["epochs_run"] >= 1
