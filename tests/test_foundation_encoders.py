"""Pathology foundation-model entries of the encoder registry: build, read-out, weights, geometry check.

No download happens here. Entries are built with random weights; the CI-sized builds shrink the depth (one block)
and the input (28-64 px), which keeps every architectural choice of the entry (width, heads, registers, SwiGLU,
LayerScale, poolers, read-out) and so its output dimension. Full-size builds carry the ``large_encoder`` marker.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch

pytest.importorskip("timm")
pytest.importorskip("transformers")

from histoexp.models import REGISTRY, WeightsUnavailableError, check_patch_mpp, get_encoder, list_encoders

FOUNDATION = sorted(k for k, s in REGISTRY.items() if s.source in ("timm", "transformers", "custom"))
REQUIRED = [
    "uni",
    "uni2-h",
    "conch",
    "conch-v1.5",
    "virchow",
    "virchow2",
    "h-optimus-0",
    "h-optimus-1",
    "h0-mini",
    "phikon",
    "phikon-v2",
    "prov-gigapath",
    "hibou-b",
    "hibou-l",
    "ctranspath",
    "midnight",
]


def small_kwargs(key: str) -> dict:
    """Shrink depth and input, keep everything else of the entry."""
    s = REGISTRY[key]
    if s.source == "timm":
        return {"depth": 1, "img_size": 28 if s.timm_kwargs.get("patch_size", 14) == 14 else 32}
    if s.source == "transformers":
        return {"num_hidden_layers": 1, "image_size": 28 if s.timm_kwargs["patch_size"] == 14 else 32}
    if s.arch.startswith("conch"):
        return {"depth": 1, "img_size": 64}
    return {}  # CTransPath: Swin-T is small; its window grid needs 224 px


def _batch(n=2, px=40, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, px, px, 3), dtype=np.uint8))


def _feats(enc, x):
    with torch.inference_mode():
        return enc.module(enc.preprocess(x))


def _small(key, seed=0, **kw):
    torch.manual_seed(seed)
    return get_encoder(key, weights=None, model_kwargs=small_kwargs(key), **kw)


def test_registry_has_the_foundation_models():
    table = list_encoders()
    assert set(REQUIRED) <= set(table.index)
    for col in ("dim", "mpp", "licence", "gated", "readout", "input_size"):
        assert col in table.columns
    assert table.loc["virchow2", "dim"] == 2560 and table.loc["virchow2", "mpp"] == "0.25-2"
    assert table.loc["uni", "mpp"] == "0.5" and bool(table.loc["uni", "gated"])
    assert table.loc["resnet50", "mpp"] == ""  # ImageNet CNN: no training µm/px
    # published numbers the entries must carry
    assert REGISTRY["virchow"].timm_kwargs["mlp_ratio"] == 5.3375
    assert REGISTRY["virchow2"].timm_kwargs["reg_tokens"] == 4
    assert REGISTRY["uni2-h"].timm_kwargs["reg_tokens"] == 8
    assert REGISTRY["conch"].input_size == 448 and REGISTRY["conch"].mean[0] == pytest.approx(0.48145466)
    assert REGISTRY["h0-mini"].mean == REGISTRY["h-optimus-0"].mean
    assert REGISTRY["midnight"].mean == (0.5, 0.5, 0.5)


@pytest.mark.parametrize("key", FOUNDATION)
def test_entry_builds_with_documented_dim(key, caplog):
    spec = REGISTRY[key]
    with caplog.at_level(logging.WARNING, logger="histoexp"):
        enc = _small(key)
    assert "random initialisation" in caplog.text
    assert enc.dim == spec.dim and enc.config["random_init"] is True
    assert enc.mpp == spec.mpp and enc.config["mpp"] == spec.mpp
    assert enc.config["readout"] == spec.readout and enc.config["gated"] == spec.gated
    out = _feats(enc, _batch())
    assert out.shape == (2, spec.dim) and torch.isfinite(out).all()
    if spec.source == "timm" and spec.readout != "pooled":
        # the published architecture arguments reached timm unchanged
        bb = enc.module.backbone
        assert bb.num_features * (2 if spec.readout == "cls+mean" else 1) == spec.dim
        assert bb.num_prefix_tokens == 1 + int(spec.timm_kwargs.get("reg_tokens", 4 if "reg4" in spec.arch else 0))


def test_readout_virchow2_by_hand():
    enc = _small("virchow2")
    x = enc.preprocess(_batch(3))
    with torch.inference_mode():
        tokens = enc.module.tokens(x)
        feats = enc.module(x)
    n_reg = 4
    assert tokens.shape[1] == 1 + n_reg + (28 // 14) ** 2
    expected = torch.cat([tokens[:, 0], tokens[:, 1 + n_reg :].mean(1)], dim=-1)
    assert torch.allclose(feats, expected, atol=1e-6)
    # the registers are excluded: including them gives another vector
    wrong = torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], dim=-1)
    assert not torch.allclose(feats, wrong, atol=1e-4)


@pytest.mark.parametrize(("key", "n_prefix"), [("virchow", 1), ("h0-mini", 5), ("midnight", 1)])
def test_readout_cls_plus_mean_by_hand(key, n_prefix):
    enc = _small(key)
    x = enc.preprocess(_batch(2))
    with torch.inference_mode():
        tokens = enc.module.tokens(x)
        feats = enc.module(x)
    assert enc.module.num_prefix_tokens == n_prefix
    assert torch.allclose(feats, torch.cat([tokens[:, 0], tokens[:, n_prefix:].mean(1)], -1), atol=1e-6)


@pytest.mark.parametrize("key", ["uni", "uni2-h", "h-optimus-1", "prov-gigapath", "phikon", "phikon-v2"])
def test_readout_class_token_by_hand(key):
    enc = _small(key)
    x = enc.preprocess(_batch(2))
    with torch.inference_mode():
        assert torch.equal(enc.module(x), enc.module.tokens(x)[:, 0])


def test_readout_hibou_pooler_is_normed_class_token():
    enc = _small("hibou-b")
    x = enc.preprocess(_batch(2))
    with torch.inference_mode():
        out = enc.module.backbone(pixel_values=x)
        assert torch.allclose(enc.module(x), out.last_hidden_state[:, 0], atol=1e-6)
    assert enc.module.backbone.config.num_register_tokens == 4


@pytest.mark.parametrize("key", FOUNDATION)
def test_local_state_dict_roundtrip(tmp_path, key):
    from safetensors.torch import save_file

    src = _small(key, seed=0)
    bb = getattr(src.module, "backbone", src.module)
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in bb.state_dict().items()}, str(path))
    torch.manual_seed(1)  # another random init underneath: the file must win
    loaded = get_encoder(key, weights=str(path), model_kwargs=small_kwargs(key))
    assert loaded.config["random_init"] is False and loaded.config["weights"] == os.path.abspath(path)
    x = _batch(2, seed=3)
    assert torch.equal(_feats(src, x), _feats(loaded, x))


def test_local_torch_save_in_hub_layout_folder(tmp_path):
    # a folder laid out as the hub repository (pytorch_model.bin), read with torch.load(weights_only=True)
    src = _small("uni")
    torch.save(src.module.backbone.state_dict(), tmp_path / "pytorch_model.bin")
    loaded = get_encoder("uni", weights=str(tmp_path), model_kwargs=small_kwargs("uni"))
    x = _batch(2, seed=4)
    assert torch.equal(_feats(src, x), _feats(loaded, x))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin"):
        get_encoder("uni", weights=str(tmp_path / "empty"), model_kwargs=small_kwargs("uni"))


def test_local_weights_wrong_architecture_refused(tmp_path):
    src = _small("virchow")  # no registers
    torch.save(src.module.backbone.state_dict(), tmp_path / "w.pt")
    with pytest.raises(ValueError, match="does not match"):
        get_encoder("virchow2", weights=str(tmp_path / "w.pt"), model_kwargs=small_kwargs("virchow2"))


def test_conch_full_checkpoint_keeps_the_vision_tower(tmp_path):
    # the published CONCH file holds the whole CoCa model: visual.* (with the caption pooler) and text.*
    src = _small("conch")
    state = {f"visual.{k}": v for k, v in src.module.state_dict().items()}
    state["visual.attn_pool_caption.query"] = torch.zeros(256, 768)
    state["visual.proj_contrast"] = torch.zeros(512, 512)
    state["text.token_embedding.weight"] = torch.zeros(10, 768)
    state["logit_scale"] = torch.zeros(())
    torch.save({"state_dict": state}, tmp_path / "pytorch_model.bin")
    loaded = get_encoder("conch", weights=str(tmp_path), model_kwargs=small_kwargs("conch"))
    x = _batch(2, seed=5)
    assert torch.equal(_feats(src, x), _feats(loaded, x))


def test_conch_position_embedding_resampled_to_the_input_grid(tmp_path):
    src = _small("conch")  # 64 px: a 4 x 4 grid
    torch.save(src.module.state_dict(), tmp_path / "w.pt")
    kw = {**small_kwargs("conch"), "img_size": 128}  # 8 x 8 grid
    loaded = get_encoder("conch", weights=str(tmp_path / "w.pt"), model_kwargs=kw)
    assert loaded.input_size == 128 and loaded.module.trunk.pos_embed.shape[1] == 1 + 64
    assert _feats(loaded, _batch(1, px=128)).shape == (1, 512)


def test_ctranspath_original_checkpoint_layout(tmp_path):
    # TransPath checkpoints use the timm 0.5 Swin layout: the patch merging of stage i sits at the end of stage i
    # (layers.i.downsample) and non-persistent buffers are saved; they must map onto the current layout
    src = _small("ctranspath")
    old = {}
    for k, v in src.module.state_dict().items():
        if ".downsample." in k:
            i = int(k.split(".")[1])
            k = k.replace(f"layers.{i}.downsample", f"layers.{i - 1}.downsample")
        old[k] = v
    old["layers.0.blocks.1.attn_mask"] = torch.zeros(64, 49, 49)
    old["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(49, 49, dtype=torch.long)
    old["head.weight"], old["head.bias"] = torch.zeros(1000, 768), torch.zeros(1000)
    assert "layers.0.downsample.reduction.weight" in old
    torch.save({"model": old}, tmp_path / "CHIEF_CTransPath.pth")
    loaded = get_encoder("ctranspath", weights=str(tmp_path))
    x = _batch(2, seed=6)
    assert torch.equal(_feats(src, x), _feats(loaded, x))


def test_transformers_local_folder_through_from_pretrained(tmp_path):
    src = _small("phikon-v2")
    src.module.backbone.save_pretrained(tmp_path)  # config.json + model.safetensors, as on the hub
    loaded = get_encoder("phikon-v2", weights=str(tmp_path))
    assert loaded.config["weights"] == os.path.abspath(tmp_path)
    x = _batch(2, px=32, seed=7)
    # the folder's own config (one layer, 32 px) is used; the input size stays the entry's, so compare at 32 px
    with torch.inference_mode():
        assert torch.allclose(src.module(src.preprocess(x)), loaded.module(src.preprocess(x)), atol=1e-6)


def test_gated_or_offline_hub_errors_name_the_remedies(monkeypatch):
    from types import SimpleNamespace

    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError

    # the error only reads headers and request from the HTTP response
    response = SimpleNamespace(headers={}, request=None, status_code=403)

    def gated(*args, **kwargs):
        raise GatedRepoError("Access to model MahmoodLab/conch is restricted.", response=response)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", gated)
    with pytest.raises(WeightsUnavailableError) as err:
        get_encoder("conch")
    msg = str(err.value)
    for needle in ("weights='/local/path", "huggingface-cli login", "HF_TOKEN", "weights=None", "gated"):
        assert needle in msg
    assert isinstance(err.value.__cause__, GatedRepoError)

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("Cannot reach the Hub and the file is not in the local cache.")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(WeightsUnavailableError, match="CHIEF_CTransPath"):
        get_encoder("ctranspath")


def test_transformers_hub_offline_error(monkeypatch):
    import transformers

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.")

    monkeypatch.setattr(transformers.Dinov2Model, "from_pretrained", offline)
    with pytest.raises(WeightsUnavailableError, match="HF_TOKEN") as err:
        get_encoder("midnight")
    assert "kaiko-ai/midnight" in str(err.value)


# ---------------------------------------------------------------------------------------------------------------
# geometry
# ---------------------------------------------------------------------------------------------------------------


def test_check_patch_mpp_rule(caplog):
    enc = _small("uni")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="histoexp"):
        assert check_patch_mpp(enc, 0.55) == pytest.approx(1.1)
    assert caplog.text == ""
    with caplog.at_level(logging.WARNING, logger="histoexp"):
        check_patch_mpp(enc, 0.69)
    assert "0.69 µm/px" in caplog.text and "mpp=0.5" in caplog.text
    with pytest.raises(ValueError, match=r"extract_patches\(adata, mpp=0.5") as err:
        check_patch_mpp(enc, 1.0)
    assert "mpp=None" in str(err.value)
    assert check_patch_mpp(enc, None) is None
    # a multi-magnification model accepts its whole range
    v2 = _small("virchow2")
    assert check_patch_mpp(v2, 1.0) == 1.0 and check_patch_mpp(v2, 0.3) == 1.0
    with pytest.raises(ValueError):
        check_patch_mpp(v2, 4.5)
    # stated intent: the user's µm/px becomes the reference; None switches the check off
    assert check_patch_mpp(_small("uni", mpp=1.0), 1.0) == 1.0
    assert check_patch_mpp(_small("uni", mpp=None), 1.0) is None
    assert check_patch_mpp(get_encoder("resnet18", weights=None), 2.0) is None
    # a user module has no training µm/px unless the user states one
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    assert check_patch_mpp(get_encoder(net), 2.0) is None
    with pytest.raises(ValueError, match="another magnification"):
        check_patch_mpp(get_encoder(net, mpp=0.5), 2.0)
    with pytest.raises(ValueError, match="`mpp` must be"):
        get_encoder("uni", weights=None, mpp="0.5")


def test_embed_patches_refuses_another_magnification_on_her2st(her2st_c2):
    import histoexp as hx

    ad = her2st_c2[:12].copy()
    hx.pp.extract_patches(ad, mpp=2.0, patch_px=56, key_added="coarse")
    enc = _small("uni")
    with pytest.raises(ValueError, match="another magnification"):
        hx.tl.embed_patches(ad, encoder=enc, patches_key="coarse")
    assert "X_uni" not in ad.obsm
    hx.pp.extract_patches(ad, mpp=0.5, patch_px=224, key_added="fine")
    hx.tl.embed_patches(ad, encoder=enc, patches_key="fine", batch_size=6)
    assert ad.obsm["X_uni"].shape == (12, 1024)
    assert ad.uns["histoexp"]["embeddings"]["X_uni"]["config"]["mpp"] == 0.5


# ---------------------------------------------------------------------------------------------------------------
# full size. Measured (benchmarks/results/encoder_build.md, random weights, one process each): the five entries
# under 100 M parameters build in 4-6 s and < 1.5 GB and run here; the 0.3-1.1 B parameter entries take 10-32 s
# and 2.3-5.4 GB each (about 3.5 min and more memory than CI can spare next to the suite), so they carry the
# large_encoder marker and run with HISTOEXP_TEST_LARGE_ENCODERS=1
# ---------------------------------------------------------------------------------------------------------------

SMALL = ["conch", "ctranspath", "h0-mini", "hibou-b", "phikon"]
LARGE = sorted(set(FOUNDATION) - set(SMALL))


def _full_size_input(key):
    s = REGISTRY[key]
    if s.source == "transformers":
        return {"image_size": 28 if s.timm_kwargs["patch_size"] == 14 else 32}
    if s.source == "custom":
        return {"img_size": 64} if s.arch.startswith("conch") else {}
    return {"img_size": 28 if s.timm_kwargs.get("patch_size", 14) == 14 else 32}


@pytest.mark.parametrize("key", SMALL)
def test_small_entry_full_depth(key):
    s = REGISTRY[key]
    enc = get_encoder(key, weights=None, model_kwargs=_full_size_input(key))
    assert _feats(enc, _batch(1)).shape == (1, s.dim)


@pytest.mark.large_encoder
@pytest.mark.parametrize("key", LARGE)
def test_large_entry_full_depth(key):
    if os.environ.get("HISTOEXP_TEST_LARGE_ENCODERS") != "1":
        pytest.skip("full-size foundation model: set HISTOEXP_TEST_LARGE_ENCODERS=1 (needs up to ~5.5 GB RAM)")
    s = REGISTRY[key]
    enc = get_encoder(key, weights=None, model_kwargs=_full_size_input(key))
    assert _feats(enc, _batch(1)).shape == (1, s.dim)


def test_docs_registry_table_matches_the_registry():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "encoders.md").read_text()
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 10 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = cells
    assert set(rows) == set(REGISTRY)
    for key, cells in rows.items():
        s = REGISTRY[key]
        mpp = f"{s.mpp_range[0]:g}–{s.mpp_range[1]:g}" if s.mpp_range else (f"{s.mpp:g}" if s.mpp else "—")
        assert (int(cells[2]), cells[3], int(cells[4]), cells[6]) == (s.dim, s.readout, s.input_size, mpp), key
        assert cells[9] == ("yes" if s.gated else "no"), key


# ---------------------------------------------------------------------------------------------------------------
# the hub paths: what the published loading code is called with (no network: the loaders are stood in for)
# ---------------------------------------------------------------------------------------------------------------


def test_timm_hub_call_carries_the_published_arguments(monkeypatch):
    import timm

    calls = []
    real = timm.create_model

    def spy(name, **kw):
        calls.append((name, dict(kw)))
        arch = REGISTRY["virchow2"].arch  # build the same architecture locally, one block, no download
        return real(arch, **{**kw, "pretrained": False, "depth": 1, "img_size": 28})

    monkeypatch.setattr(timm, "create_model", spy)
    enc = get_encoder("virchow2")
    name, kw = calls[0]
    assert name == "hf-hub:paige-ai/Virchow2" and kw["pretrained"] is True
    assert kw["mlp_layer"] is timm.layers.SwiGLUPacked and kw["act_layer"] == "silu"
    assert kw["reg_tokens"] == 4 and kw["mlp_ratio"] == 5.3375 and kw["init_values"] == 1e-5
    assert kw["global_pool"] == "" and kw["num_classes"] == 0 and kw["dynamic_img_size"] is True
    assert enc.config["weights"] == "hf-hub:paige-ai/Virchow2" and enc.config["random_init"] is False
    assert enc.module.readout == "cls+mean" and enc.module.num_prefix_tokens == 5


def test_transformers_hub_call_uses_from_pretrained(monkeypatch):
    import transformers

    calls = []
    small = _small("hibou-b").module.backbone

    def fake(source, **kw):
        calls.append((source, kw))
        return small

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", fake)
    enc = get_encoder("hibou-b")
    assert calls == [("histai/hibou-b", {"trust_remote_code": True, "local_files_only": False})]
    assert enc.config["weights"] == "hf:histai/hibou-b" and enc.dim == 768

    calls.clear()
    monkeypatch.setattr(transformers.ViTModel, "from_pretrained", fake)
    get_encoder("phikon")
    assert calls == [("owkin/phikon", {"local_files_only": False, "add_pooling_layer": False})]


def test_custom_hub_download_loads_the_published_file(tmp_path, monkeypatch):
    import huggingface_hub

    src = _small("ctranspath")
    path = tmp_path / "CHIEF_CTransPath.pth"
    torch.save({"model": src.module.state_dict()}, path)
    calls = []

    def fake_download(**kw):
        calls.append(kw)
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    enc = get_encoder("ctranspath")
    assert calls == [
        {
            "repo_id": "MahmoodLab/hest-bench",
            "filename": "fm_v1/ctranspath/CHIEF_CTransPath.pth",
            "repo_type": "dataset",
        }
    ]
    assert enc.config["weights"] == "hf-dataset:MahmoodLab/hest-bench/fm_v1/ctranspath/CHIEF_CTransPath.pth"
    x = _batch(2, seed=8)
    assert torch.equal(_feats(src, x), _feats(enc, x))


def test_transformers_entries_name_the_extra_when_missing(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    with pytest.raises(ImportError, match=r"histoexp\[hf\]"):
        get_encoder("phikon", weights=None)
    assert get_encoder("conch", weights=None, model_kwargs=small_kwargs("conch")).dim == 512  # others unaffected
