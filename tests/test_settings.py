"""hx.settings.num_workers: validated, and the default worker count of hx.tl.embed_patches."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

import histoexp as hx
from histoexp._settings import Settings


@pytest.fixture
def restore_num_workers():
    old = hx.settings.num_workers
    yield
    hx.settings.num_workers = old


def test_num_workers_setting_is_validated(restore_num_workers):
    assert Settings().num_workers == 0
    hx.settings.num_workers = np.int64(2)
    assert hx.settings.num_workers == 2 and type(hx.settings.num_workers) is int
    assert "num_workers=2" in repr(hx.settings)
    for bad in (-1, 1.5, True, "2", None):
        with pytest.raises(ValueError, match=r"`num_workers` must be a non-negative integer.*got"):
            hx.settings.num_workers = bad
    assert hx.settings.num_workers == 2  # a refused value leaves the setting as it was
    hx.settings.num_workers = 0
    assert hx.settings.num_workers == 0


def test_embed_patches_takes_num_workers_from_settings(monkeypatch, restore_num_workers):
    """The DataLoader gets hx.settings.num_workers unless the argument says otherwise; workers give the same numbers."""
    from torch.utils.data import DataLoader

    seen = []
    init = DataLoader.__init__

    def spy(self, *args, **kwargs):
        bound = inspect.signature(init).bind(self, *args, **kwargs)
        seen.append(bound.arguments.get("num_workers", 0))
        init(self, *args, **kwargs)

    monkeypatch.setattr(DataLoader, "__init__", spy)
    adata = hx.datasets.synthetic(n_sections=1, n_side=6, random_state=0)
    hx.pp.extract_patches(adata, size_um=64.0, patch_px=32, store="memory")
    hx.tl.embed_patches(adata, "handcrafted", batch_size=8, key_added="X_default")
    hx.settings.num_workers = 1
    hx.tl.embed_patches(adata, "handcrafted", batch_size=8, key_added="X_setting")
    hx.tl.embed_patches(adata, "handcrafted", batch_size=8, num_workers=0, key_added="X_argument")
    assert seen == [0, 1, 0]
    np.testing.assert_array_equal(adata.obsm["X_setting"], adata.obsm["X_default"])
    np.testing.assert_array_equal(adata.obsm["X_argument"], adata.obsm["X_default"])
    with pytest.raises(ValueError, match="num_workers"):
        hx.tl.embed_patches(adata, "handcrafted", num_workers=-1, key_added="X_bad")


def test_info_messages_shown_at_verbosity_2():
    """histoexp's logger has its own handler: info shows at verbosity 2 (the fallback shows warnings only)."""
    import subprocess
    import sys

    code = (
        "import logging, histoexp as hx\n"
        "log = logging.getLogger('histoexp')\n"
        "log.info('hidden at 1')\n"
        "hx.settings.verbosity = 2\n"
        "log.info('shown at 2')\n"
        "hx.settings.verbosity = 0\n"
        "log.warning('hidden at 0')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stderr.strip().splitlines()[-1:] == ["shown at 2"], out.stderr
    assert "hidden" not in out.stderr
