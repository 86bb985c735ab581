"""Tables a cross-fitted model carries: expected accuracy per gene and residual quantiles (numpy only).

Cross-fitting (:mod:`histoexp.tl._crossfit`) predicts each training section from a model trained on the others
and keeps, per model gene, the Pearson r and gene-specific r of every fold (``arrays['crossfit_pcc']``,
``arrays['crossfit_pcc_specific']``: genes x folds) and quantiles of the absolute out-of-fold residuals at
``config['crossfit']['levels']`` (``arrays['residual_quantiles']``: genes x levels). This module turns them into
what :func:`histoexp.tl.impute` writes.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

#: A gene is expected to carry gene-specific signal when its cross-fitted gene-specific r averages at least this
#: much over the folds and is positive in every fold.
SPECIFIC_MIN = 0.1


def expected_table(model) -> pd.DataFrame | None:
    """Per model gene: expected PCC and gene-specific PCC (mean, sd over folds) and ``expected_specific``."""
    pcc = model.arrays.get("crossfit_pcc")
    spec = model.arrays.get("crossfit_pcc_specific")
    if pcc is None or spec is None:
        return None
    pcc, spec = np.asarray(pcc, dtype=np.float64), np.asarray(spec, dtype=np.float64)
    rule = (model.config.get("crossfit") or {}).get("specific_min", SPECIFIC_MIN)
    with np.errstate(invalid="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows: genes constant in every fold
            table = pd.DataFrame(
                {
                    "expected_pcc": np.nanmean(pcc, 1),
                    "expected_pcc_sd": np.nanstd(pcc, 1),
                    "expected_pcc_specific": np.nanmean(spec, 1),
                    "expected_pcc_specific_sd": np.nanstd(spec, 1),
                    "expected_specific": (np.nanmean(spec, 1) >= rule) & (np.nanmin(spec, 1) > 0),
                },
                index=pd.Index(model.genes, name="gene"),
            )
    return table
