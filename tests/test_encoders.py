"""Encoder registry and get_encoder: torchvision, timm, user modules, local weights, offline errors, handcrafted."""

from __future__ import annotations

import logging
import os
import urllib.error

import numpy as np
import pytest
import torch
from torch import nn

from histoexp.models import (
    HANDCRAFTED_FEATURES,
    Encoder,
    WeightsUnavailableError,
    get_encoder,
    handcrafted_features,
    list_encoders,
    register_encoder,
)
from histoexp.models import encoders as enc_mod


def _uint8(b=2, px=64, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (b, px, px, 3), dtype=np.uint8))


def test_registry_lists_required_entries():
    keys = list_encoders().index
    for k in ("resnet50", "resnet18", "densenet121", "handcrafted", "uni", "h-optimus-0"):
        assert k in keys
    uni = enc_mod.REGISTRY["uni"]
    assert uni.gated and uni.weights == "hf-hub:MahmoodLab/uni" and uni.dim == 1024
    assert enc_mod.REGISTRY["h-optimus-0"].mean == (0.707223, 0.578729, 0.703617)


def test_register_encoder_refuses_duplicates():
    with pytest.raises(KeyError, match="already registered"):
        register_encoder(key="resnet18", source="torchvision", arch="resnet18", dim=512)
    with pytest.raises(ValueError, match="source"):
        register_encoder(key="x-new", source="keras", arch="x", dim=1)


def test_resnet18_random_init_logged_and_recorded(caplog):
    with caplog.at_level(logging.WARNING, logger="histoexp"):
        enc = get_encoder("resnet18", weights=None)
    assert "random initialisation" in caplog.text
    assert isinstance(enc, Encoder)
    assert enc.name == "resnet18" and enc.dim == 512 and enc.trainable
    assert enc.config["random_init"] is True and enc.random_init
    assert enc.config["input_size"] == 224 and enc.config["mean"] == [0.485, 0.456, 0.406]
    x = enc.preprocess(_uint8(2, 64))
    assert x.shape == (2, 3, 224, 224) and x.dtype == torch.float32
    out = enc.module(x)
    assert out.shape == (2, 512)
    import json

    json.dumps(enc.config)  # JSON-able


@pytest.mark.parametrize(("key", "dim"), [("resnet50", 2048), ("densenet121", 1024)])
def test_big_torchvision_dims_by_construction(key, dim):
    enc = get_encoder(key, weights=None)
    assert enc.dim == dim
    # a dry run on a tiny input confirms the registry's dimension without a full-size forward pass
    assert enc_mod._infer_dim(enc.module, 32) == dim


def test_preprocess_normalises():
    enc = get_encoder("resnet18", weights=None)
    mean = np.asarray(enc.mean) * 255
    img = torch.from_numpy(np.broadcast_to(mean, (1, 224, 224, 3)).copy()).float()
    x = enc.preprocess(img)
    assert torch.allclose(x, torch.zeros_like(x), atol=1e-5)
    white = enc.preprocess(torch.full((1, 224, 224, 3), 255, dtype=torch.uint8))
    expected = (1 - np.asarray(enc.mean)) / np.asarray(enc.std)
    assert np.allclose(white[0, :, 0, 0].numpy(), expected, atol=1e-5)


def test_timm_tiny_model():
    pytest.importorskip("timm")
    enc = get_encoder("timm:test_vit", weights=None)
    assert enc.name == "test_vit" and enc.dim == 64 and enc.random_init
    x = enc.preprocess(_uint8(2, 48))
    assert x.shape[-1] == enc.input_size
    assert enc.module(x).shape == (2, 64)
    # a bare timm name works too
    assert get_encoder("test_vit", weights=None).dim == 64


def test_timm_registry_alias_random_init_needs_no_network(monkeypatch):
    timm = pytest.importorskip("timm")
    calls = []
    real = timm.create_model

    def spy(name, **kw):
        calls.append((name, kw))
        kw = {**kw, "depth": 1}  # keep the test light: same architecture family, one block
        return real(name, **kw)

    monkeypatch.setattr(timm, "create_model", spy)
    enc = get_encoder("uni", weights=None)
    assert calls[0][0] == "vit_large_patch16_224" and calls[0][1]["pretrained"] is False
    assert calls[0][1]["init_values"] == 1e-5 and calls[0][1]["num_classes"] == 0
    assert enc.dim == 1024 and enc.config["gated"] is True and "CC-BY-NC-ND" in enc.config["licence"]


def test_unknown_encoder_lists_options():
    with pytest.raises(ValueError, match="resnet50") as err:
        get_encoder("not-a-model-xyz", weights=None)
    assert "timm:" in str(err.value) and "hf-hub:" in str(err.value)


def test_custom_module_dim_inferred_and_transform():
    net = nn.Sequential(nn.Conv2d(3, 5, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    enc = get_encoder(net, transform={"input_size": 32, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)})
    assert enc.dim == 5 and enc.input_size == 32 and enc.config["random_init"] is False
    assert enc.preprocess(_uint8(3, 64)).shape == (3, 3, 32, 32)
    assert enc.embed(_uint8(3, 64)).shape == (3, 5)

    def tf(batch):
        return batch.permute(0, 3, 1, 2).float() / 255.0

    enc2 = get_encoder(net, transform=tf)
    b = _uint8(2, 20)
    assert torch.equal(enc2.preprocess(b), tf(b))
    # a module that does not pool is refused with a clear message
    with pytest.raises(ValueError, match=r"\(B, dim\)"):
        get_encoder(nn.Conv2d(3, 4, 3))
    # an Encoder passes through unchanged
    assert get_encoder(enc) is enc


def _features(enc, x):
    with torch.inference_mode():
        return enc.module(enc.preprocess(x))


@pytest.mark.parametrize("fmt", ["pt", "safetensors", "torchvision-full"])
def test_local_weights_roundtrip(tmp_path, fmt):
    torch.manual_seed(0)
    src = get_encoder("resnet18", weights=None)
    if fmt == "pt":
        path = tmp_path / "w.pt"
        torch.save(src.module.state_dict(), path)
    elif fmt == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in src.module.state_dict().items()}, str(path))
    else:  # a full torchvision checkpoint with the classifier head, wrapped as DataParallel would save it
        import torchvision

        full = torchvision.models.resnet18(weights=None)
        full.load_state_dict({**src.module.state_dict(), **{k: v for k, v in full.state_dict().items() if "fc" in k}})
        path = tmp_path / "full.pth"
        torch.save({"state_dict": {f"module.{k}": v for k, v in full.state_dict().items()}}, path)
    torch.manual_seed(1)  # a different random init underneath: the file must win
    loaded = get_encoder("resnet18", weights=str(path))
    assert loaded.config["random_init"] is False and loaded.config["weights"] == os.path.abspath(path)
    x = _uint8(2, 64, seed=3)
    assert torch.equal(_features(src, x), _features(loaded, x))


def test_local_weights_mismatch(tmp_path):
    path = tmp_path / "r50.pt"
    torch.save(get_encoder("resnet50", weights=None).module.state_dict(), path)
    with pytest.raises(ValueError, match="does not match"):
        get_encoder("resnet18", weights=str(path))
    with pytest.raises(FileNotFoundError):
        get_encoder("resnet18", weights=str(tmp_path / "missing.pt"))


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.makedirs, (self.target,))


def test_pickle_with_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"conv1.weight": _Evil(str(marker))}, path)
    with pytest.raises(ValueError, match="never unpickles code"):
        get_encoder("resnet18", weights=str(path))
    assert not marker.exists()


def test_offline_torchvision_error(monkeypatch, tmp_path):
    import torchvision.models._api as tv_api

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(tv_api, "load_state_dict_from_url", no_network)
    with pytest.raises(WeightsUnavailableError) as err:
        get_encoder("resnet18")  # weights='default': ImageNet
    msg = str(err.value)
    assert "Could not obtain the pretrained weights" in msg and "resnet18" in msg
    assert "weights=None" in msg and "weights='/local/path" in msg and "huggingface-cli login" in msg
    assert isinstance(err.value.__cause__, urllib.error.URLError)


def test_offline_hf_hub_gated_error(monkeypatch):
    pytest.importorskip("timm")
    import timm.models._hub as timm_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def no_network(*args, **kwargs):
        raise LocalEntryNotFoundError("Cannot reach the Hub and the file is not in the local cache.")

    monkeypatch.setattr(timm_hub, "hf_hub_download", no_network)
    with pytest.raises(WeightsUnavailableError) as err:
        get_encoder("uni")
    msg = str(err.value)
    assert "gated" in msg and "HF_TOKEN" in msg and "weights=None" in msg
    with pytest.raises(WeightsUnavailableError, match="weights=None"):
        get_encoder("hf-hub:some-org/some-model")


def test_bad_weights_argument():
    with pytest.raises(ValueError, match="IMAGENET1K"):
        get_encoder("resnet18", weights="NOT_A_WEIGHT")
    with pytest.raises(ValueError, match="no weights"):
        get_encoder("handcrafted", weights="x.pt")


# ---------------------------------------------------------------------------------------------------------------
# handcrafted
# ---------------------------------------------------------------------------------------------------------------


def test_handcrafted_encoder_interface():
    enc = get_encoder("handcrafted")
    assert not enc.trainable and enc.dim == len(HANDCRAFTED_FEATURES) and enc.input_size == 112
    assert enc.config["features"] == list(HANDCRAFTED_FEATURES) and enc.config["random_init"] is False
    x = _uint8(4, 224)
    f1, f2 = enc.embed(x), enc.embed(x)
    assert f1.shape == (4, enc.dim) and f1.dtype == torch.float32
    assert torch.equal(f1, f2) and torch.isfinite(f1).all()
    # same numbers as the numpy function on the resized batch
    ref = handcrafted_features(enc.preprocess(x).permute(0, 2, 3, 1).numpy())
    assert np.allclose(f1.numpy(), ref)


def test_handcrafted_glcm_matches_skimage():
    from skimage.feature import graycomatrix, graycoprops

    from histoexp.models import handcrafted as hc

    rng = np.random.default_rng(0)
    q = rng.integers(0, hc.GLCM_LEVELS, (3, 40, 40))
    q[2] = np.repeat(np.arange(40) // 2, 40).reshape(40, 40)  # structured image
    ours = hc._glcm_props(q, hc.GLCM_LEVELS, 2)
    for k in range(3):
        m = graycomatrix(q[k].astype(np.uint8), [2], [0, np.pi / 2], levels=hc.GLCM_LEVELS, symmetric=True, normed=True)
        ref = [graycoprops(m, p).mean() for p in ("contrast", "homogeneity", "energy", "correlation")]
        assert np.allclose(ours[k], ref, atol=1e-10)


def test_handcrafted_nuclei_counts_blobs():
    from histoexp.models import handcrafted as hc

    mask = np.zeros((3, 50, 50), dtype=bool)
    mask[0, 5:10, 5:10] = True  # 25 px blob
    mask[0, 30:34, 30:34] = True  # 16 px blob
    mask[0, 45, 45] = True  # 1 px: below NUCLEI_MIN_AREA
    mask[2, 0:6, 0:6] = True  # blob touching the border; patch 1 empty
    count, area = hc._nuclei(mask)
    scale = 1e4 / (50 * 50)
    assert np.allclose(count, [2 * scale, 0, 1 * scale])
    assert np.allclose(area, [20.5, 0, 36])


def test_handcrafted_white_vs_stained():
    white = np.full((1, 112, 112, 3), 240, dtype=np.uint8)
    rng = np.random.default_rng(1)
    # a pink background with dark purple "nuclei"
    tissue = np.empty((1, 112, 112, 3), dtype=np.uint8)
    tissue[:] = (230, 160, 200)
    for _ in range(30):
        y, x = rng.integers(4, 108, 2)
        tissue[0, y - 3 : y + 3, x - 3 : x + 3] = (70, 40, 120)
    f = handcrafted_features(np.concatenate([white, tissue]))
    idx = {n: i for i, n in enumerate(HANDCRAFTED_FEATURES)}
    assert f[0, idx["tissue_fraction"]] == 0 and f[1, idx["tissue_fraction"]] > 0.9
    assert f[0, idx["nuclei_count"]] == 0 and f[1, idx["nuclei_count"]] > 5
    assert f[1, idx["h_mean"]] > f[0, idx["h_mean"]] + 0.005
    assert f[1, idx["nuclei_fraction"]] > 0.03 and f[0, idx["nuclei_fraction"]] == 0
    assert np.isfinite(f).all()
