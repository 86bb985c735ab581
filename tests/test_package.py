"""Package-level behaviour: fast import without torch, settings, public namespaces."""

import subprocess
import sys

import pytest


def test_import_is_lazy():
    # a fast import is a property of what gets imported, not a wall-clock figure (noisy on CI)
    code = (
        "import sys; import histoexp as hx; "
        "print(','.join(m for m in ('torch', 'torchvision', 'squidpy', 'spatialdata', 'timm', 'scanpy', "
        "'transformers', 'huggingface_hub') "
        "if m in sys.modules))"
    )
    heavy = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.strip()
    assert heavy == "", f"heavy modules imported at `import histoexp`: {heavy}"


def test_namespaces():
    import histoexp as hx

    for mod in (hx.pp, hx.tl, hx.pl, hx.io, hx.datasets):
        for name in mod.__all__:
            assert callable(getattr(mod, name)), f"{mod.__name__}.{name}"
    assert hx.__version__


def test_settings_validation():
    import histoexp as hx

    with pytest.raises(ValueError, match="device"):
        hx.settings.device = "tpu"
    assert str(hx.settings.resolve_device("cpu")) == "cpu"
    with pytest.raises(ValueError, match="device"):
        hx.settings.resolve_device("gpu")


def test_data_dir_from_env(monkeypatch, tmp_path):
    import histoexp as hx

    monkeypatch.setenv("HISTOEXP_DATA_DIR", str(tmp_path))
    assert hx.settings.data_dir == tmp_path
    hx.settings.data_dir = tmp_path / "x"
    try:
        assert hx.settings.data_dir == tmp_path / "x"
    finally:
        hx.settings.data_dir = None


def test_expression_matrix_normalisation(synth):
    import numpy as np

    import histoexp as hx

    X_before = synth.X.copy()
    out = hx.pp.expression_matrix(synth, ["gene001", "gene000"])
    counts = synth.X.toarray()
    expected = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4)[:, [1, 0]]
    np.testing.assert_allclose(out, expected, rtol=1e-5)
    assert out.dtype == np.float32
    assert (synth.X != X_before).nnz == 0  # caller's data untouched
    with pytest.raises(KeyError, match="not in adata.var_names"):
        hx.pp.expression_matrix(synth, ["nope"])


def test_select_genes(synth):
    import histoexp as hx

    hv = hx.pp.select_genes(synth, 10)
    assert len(hv) == 10 and len(set(hv)) == 10
    assert hx.pp.select_genes(synth, ["gene003", "gene001"]) == ["gene003", "gene001"]
    assert hx.pp.select_genes(synth, "all") == list(synth.var_names)
    with pytest.raises(KeyError):
        hx.pp.select_genes(synth, ["gene003", "missing"])


def test_synthetic_expression_follows_image(synth):
    import numpy as np

    import histoexp as hx

    X = hx.pp.expression_matrix(synth)
    drivers = synth.obs[["density", "tint"]].to_numpy()
    # the hidden drivers explain a large share of expression for genes with large coefficients
    coef = synth.varm["true_coef"]
    g = int(np.argmax(np.abs(coef).sum(1)))
    r = np.corrcoef(drivers @ coef[g], X[:, g])[0, 1]
    assert r > 0.5


def test_lazy_submodules_reachable():
    # in a subprocess: other tests' imports of torch would hide an eager import here
    code = (
        "import sys; import histoexp as hx; "
        "assert 'torch' not in sys.modules, 'torch imported at import histoexp'; "
        "assert 'histoexp.models' not in sys.modules; "
        "assert {'models', 'train', 'image'} <= set(dir(hx)); "
        "m = hx.models; t = hx.train; "
        "assert 'torch' in sys.modules and m.BleepModel and m.register_model and t.fit and hx.image.SlideImage; "
        "assert hx.models is sys.modules['histoexp.models']; "
        "from histoexp import models; assert models is m; "
        "print('ok')"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]
    import histoexp as hx

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        hx.nope  # noqa: B018


def test_retrieval_weightings_public_and_registrable(monkeypatch):
    import numpy as np

    import histoexp as hx
    from histoexp.tl import _retrieval

    listed = hx.tl.retrieval_weightings()
    assert {"average", "simple", "weighted", "inverse_distance", "inverse_distance_l2"} <= set(listed)
    assert all(listed.values()), listed  # each has a description
    monkeypatch.setattr(_retrieval, "WEIGHTINGS", dict(_retrieval.WEIGHTINGS))

    @hx.tl.register_weighting("nearest_only")
    def nearest_only(t):
        """Only the most similar spot."""
        w = t.cos * 0
        w[:, 0] = 1
        return w

    assert hx.tl.retrieval_weightings()["nearest_only"] == "Only the most similar spot."
    rng = np.random.default_rng(0)
    q, bank, vals = rng.normal(size=(5, 4)), rng.normal(size=(12, 4)), rng.normal(size=(12, 3))
    pred, _ = _retrieval.retrieve(q, bank, vals, k=4, method="nearest_only")
    simple, _ = _retrieval.retrieve(q, bank, vals, k=4, method="simple")
    np.testing.assert_allclose(pred, simple, rtol=1e-5)
    with pytest.raises(ValueError, match="already a registered weighting"):
        hx.tl.register_weighting("average")(nearest_only)


def test_api_page_names_are_public():
    import re
    from pathlib import Path

    import histoexp as hx

    api = Path(__file__).parents[1] / "docs" / "api.md"
    names = re.findall(r"^   ((?:pp|tl|pl|io|datasets|image|models|train)\.\w+)$", api.read_text(), flags=re.M)
    assert len(names) > 30
    for name in names:
        mod, attr = name.split(".")
        assert not attr.startswith("_") and hasattr(getattr(hx, mod), attr), name
    assert "._" not in hx.tl.impute.__doc__  # no links to private modules


def test_progress_without_ipywidgets_is_plain_tqdm(monkeypatch):
    import tqdm.auto
    import tqdm.std

    from histoexp import _utils

    monkeypatch.setattr(_utils, "_interactive", lambda fp: True)  # a terminal or a notebook
    monkeypatch.setattr(_utils, "_has_ipywidgets", lambda: False)
    assert type(_utils.progress(range(3), disable=True)) is tqdm.std.tqdm
    monkeypatch.setattr(_utils, "_has_ipywidgets", lambda: True)
    assert isinstance(_utils.progress(range(3), disable=True), tqdm.auto.tqdm)
    monkeypatch.setattr(_utils, "_interactive", lambda fp: False)  # a log file: tqdm's text bar writing lines
    assert isinstance(_utils.progress(range(3), disable=True), tqdm.std.tqdm)
