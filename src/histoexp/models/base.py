"""The model abstraction every method plugs into.

A method is a small :class:`ExpressionModel` subclass registered with :func:`register_model`: it names
itself (``method``), says which kind it is and how to build its network from a JSON config
(:meth:`ExpressionModel.build_net`). The base owns the rest: the config, ensembles (``nets``: one network
per member), the image side (frozen features or patches through a fine-tuned encoder, run through the one
inference loop :func:`histoexp.train.infer`), extra arrays kept with the model (e.g. a reference bank),
and save/load as safetensors + JSON (:mod:`histoexp.models._io`; never pickle).

Two kinds:

- :class:`RetrievalModel` (BLEEP, mclSTExp): the image embedding of a query spot is matched against
  embeddings of reference spots (:class:`ReferenceSpots`: expression, and positions / sections where the
  method's spot branch needs them); the prediction aggregates the reference spots' expression. Networks
  provide ``encode_image(x)`` and ``encode_reference(batch)``.
- :class:`RegressionModel` (ridge, NH2ST, zero-shot): image -> expression directly. Networks provide
  ``predict(x)``; an ensemble averages its members.

``hx.tl.impute`` is the one prediction entry point for both kinds; ``hx.tl.load_model`` /
:func:`load_model` reads any registered kind back.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from .._utils import jsonable
from . import _io

__all__ = [
    "MODELS",
    "ExpressionModel",
    "ReferenceSpots",
    "RegressionModel",
    "RetrievalModel",
    "load_model",
    "register_model",
]

#: Registered model classes by ``method`` name.
MODELS: dict[str, type[ExpressionModel]] = {}


def register_model(cls: type[ExpressionModel]) -> type[ExpressionModel]:
    """Class decorator: make ``cls`` loadable by :func:`load_model` under ``cls.method``."""
    if not getattr(cls, "method", None) or cls.kind not in ("retrieval", "regression"):
        raise TypeError(f"{cls.__name__} must set `method` and `kind` ('retrieval' or 'regression').")
    if cls.method in MODELS and MODELS[cls.method] is not cls:
        raise ValueError(f"A model named {cls.method!r} is already registered ({MODELS[cls.method].__name__}).")
    MODELS[cls.method] = cls
    return cls


def load_model(path: str | os.PathLike, *, device=None) -> ExpressionModel:
    """Load a model folder written by ``model.save``, whatever its registered kind.

    Parameters
    ----------
    path
        The folder.
    device
        Move the weights there (``None``: CPU).
    """
    from . import bleep, mclstexp, nh2st, ridge, zeroshot  # noqa: F401  (register the built-in methods)

    config = _io.read_config(path)
    method = config.get("method")
    if method not in MODELS:
        raise ValueError(f"{path}: unknown model method {method!r} (known: {sorted(MODELS)}).")
    return MODELS[method].load(path, device=device)


@dataclass
class ReferenceSpots:
    """Reference spots for retrieval: what a retrieval model's spot branch reads.

    Attributes
    ----------
    expression
        ``(n, n_model_genes)`` log-normalised expression of the model genes, float32.
    coords
        ``(n, 2)`` spot positions (array coordinates), or ``None``.
    sections
        ``(n,)`` section labels (strings), or ``None``.
    """

    expression: np.ndarray
    coords: np.ndarray | None = None
    sections: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.expression = np.asarray(self.expression, dtype=np.float32)
        if self.expression.ndim != 2:
            raise ValueError(f"Reference expression must be 2-d, got shape {self.expression.shape}.")
        if not np.isfinite(self.expression).all():
            bad = int((~np.isfinite(self.expression)).any(1).sum())
            raise ValueError(f"Reference expression has non-finite values in {bad} spots (NaN or inf counts?).")
        n = len(self.expression)
        if self.coords is not None:
            self.coords = np.asarray(self.coords, dtype=np.float32)
            if self.coords.shape != (n, 2) or not np.isfinite(self.coords).all():
                raise ValueError(f"Reference coords must be finite with shape ({n}, 2), got {self.coords.shape}.")
        if self.sections is not None:
            self.sections = np.asarray(self.sections).astype(str)
            if self.sections.shape != (n,):
                raise ValueError(f"Reference sections must have shape ({n},), got {self.sections.shape}.")

    def __len__(self) -> int:
        return len(self.expression)


class ExpressionModel:
    """Base of every histoexp model (see the module docs).

    Parameters
    ----------
    nets
        The trained network(s): one per ensemble member.
    config
        JSON-able description (``genes``, ``normalize``, ``target_sum``, ``mode`` (``'frozen'`` or
        ``'finetune'``), ``use_rep``, ``embedding``, ``encoder``, ``patches``, ``feature_dim``, the
        method's settings, training ``params`` and ``history``).
    preprocess
        Patch preprocessing of a fine-tuned encoder (uint8 ``(B, px, px, 3)`` -> model input).
    arrays
        Named float arrays kept and saved with the model (e.g. a reference bank).
    """

    method: ClassVar[str] = ""
    kind: ClassVar[str] = ""

    def __init__(self, nets: nn.Module | list[nn.Module], config: dict, *, preprocess=None, arrays=None) -> None:
        nets = [nets] if isinstance(nets, nn.Module) else list(nets)
        if not nets:
            raise ValueError(f"A {type(self).__name__} needs at least one network.")
        self.nets = [n.eval() for n in nets]
        self.config = jsonable(dict(config))  # JSON-able by construction: it is saved as config.json
        self.config.update(method=self.method, kind=self.kind, n_ensemble=len(self.nets))
        self.preprocess = preprocess
        self.arrays: dict[str, np.ndarray] = {k: np.asarray(v) for k, v in (arrays or {}).items()}

    # -- to implement ------------------------------------------------------------------------------
    @classmethod
    def build_net(cls, config: dict, encoder: nn.Module | None = None) -> nn.Module:
        """Build a fresh network for ``config`` (``encoder``: the trainable image encoder in finetune mode)."""
        raise NotImplementedError

    # -- description -------------------------------------------------------------------------------
    @property
    def net(self) -> nn.Module:
        """The (first) network."""
        return self.nets[0]

    @property
    def n_ensemble(self) -> int:
        """Number of independently trained members."""
        return len(self.nets)

    @property
    def genes(self) -> list[str]:
        """Genes the model was trained on, in order."""
        return list(self.config["genes"])

    @property
    def mode(self) -> str:
        """``'frozen'`` (features from ``obsm[use_rep]``) or ``'finetune'`` (patches through the encoder)."""
        return self.config["mode"]

    @property
    def use_rep(self) -> str | None:
        """``obsm`` key of the frozen image features (``None`` in finetune mode)."""
        return self.config.get("use_rep")

    @property
    def device(self) -> torch.device:
        """Device of the weights."""
        return next(iter(self.net.parameters()), next(iter(self.net.buffers()), torch.empty(0))).device

    def to(self, device) -> ExpressionModel:
        """Move the network(s) to ``device`` (in place); returns self."""
        for net in self.nets:
            net.to(device)
        return self

    def __repr__(self) -> str:
        c = self.config
        src = f"obsm[{c.get('use_rep')!r}]" if self.mode == "frozen" else f"patches via {c['encoder'].get('name')!r}"
        return (
            f"{type(self).__name__}({self.kind}, mode={self.mode!r}, images from {src}, {len(self.genes)} genes, "
            f"n_ensemble={self.n_ensemble}{self._repr_extra()})"
        )

    def _repr_extra(self) -> str:
        return ""

    # -- reduced-rank outputs and cross-fitted expectations ---------------------------------------------
    @property
    def rank(self) -> int | None:
        """Number of expression axes the predictions of the model genes are projected onto (``None``: full rank)."""
        rank = self.config.get("rank")
        return None if rank is None else int(rank)

    @property
    def expression_axes(self) -> tuple[np.ndarray, np.ndarray] | None:
        """``(mean, axes)`` of the training expression of the model genes (``None`` for models without them).

        ``axes`` (genes x k) are the leading principal axes of the training expression (centred on ``mean``); the
        first is the shared axis :func:`histoexp.tl.impute` scores a measured query on, the first ``rank`` span
        the reduced-rank outputs.
        """
        axes = self.arrays.get("expression_axes")
        mean = self.config.get("expression_mean")
        if axes is None or mean is None:
            return None
        return np.asarray(mean, dtype=np.float64), np.asarray(axes, dtype=np.float64)

    def project_outputs(self, pred: np.ndarray, genes: list[str]) -> np.ndarray:
        """Project the model-gene columns of ``pred`` onto the first :attr:`rank` expression axes.

        ``pred`` holds ``genes`` as columns, which must include every model gene when the model has a rank (the
        projection mixes them); columns of other genes (e.g. reference genes outside the panel) are returned as
        they are. Without a rank, ``pred`` is returned unchanged.
        """
        if self.rank is None:
            return pred
        from .._stats import project

        got = self.expression_axes
        if got is None:
            raise ValueError("The model has a `rank` but no stored expression axes (an incomplete model folder).")
        mean, axes = got
        pos = {g: i for i, g in enumerate(genes)}
        missing = [g for g in self.genes if g not in pos]
        if missing:
            raise ValueError(f"Projecting onto the expression axes needs every model gene; {len(missing)} missing.")
        cols = np.asarray([pos[g] for g in self.genes])
        out = np.array(pred, dtype=np.float32, copy=True)
        out[:, cols] = project(pred[:, cols], mean, axes[:, : self.rank]).astype(np.float32)
        return out

    @property
    def expected(self):
        """Cross-fitted expected accuracy per model gene (a DataFrame), or ``None`` when the model has none.

        Columns ``expected_pcc``, ``expected_pcc_sd``, ``expected_pcc_specific``, ``expected_pcc_specific_sd``
        (mean and standard deviation over the cross-fitting folds) and ``expected_specific`` (the gene is
        expected to carry gene-specific signal; rule in :func:`histoexp.tl.fit_ridge`'s ``crossfit``).
        """
        from .._expected import expected_table

        return expected_table(self)

    def expected_for(self, genes: list[str]):
        """Return the expected accuracy of ``genes`` (rows in that order; NaN / False where the model has none).

        ``None`` when the model has no cross-fitted expectations. The default covers the model genes
        (:attr:`expected`); a model that predicts other genes (zero-shot) extends it.
        """
        table = self.expected
        if table is None:
            return None
        out = table.reindex(list(genes))
        if "expected_specific" in out:
            out["expected_specific"] = out["expected_specific"].eq(True).to_numpy(dtype=bool)  # NaN rows: False
        return out

    def image_spec(self) -> dict:
        """How a query's images must be prepared for this model: ``encoder``, ``weights``, ``patch_px``, ``size_um``.

        ``weights`` is an argument of :func:`histoexp.tl.embed_patches` (``None`` for random initialisation or
        weight-free encoders, a file path, or ``'default'``), read back from the training embedding record.
        ``scales`` is the ``scales`` argument of :func:`histoexp.tl.embed_patches` the features were computed
        with (a list of multiples of the patch side, in order; ``None``: the patch alone).
        ``slide_mpp`` is ``{section: µm per pixel}`` of the training slides (empty when not recorded): a hint
        for a query image whose µm/px is unknown, never applied without the user's say.
        """
        cfg = self.config
        emb = dict(cfg.get("embedding") or {})
        geo = dict(cfg.get("patches") or {})
        rec = emb.get("weights", "default")
        if rec in (None, "none", "random_init"):
            weights = None
        elif isinstance(rec, str) and Path(rec).exists():
            weights = rec
        else:
            weights = "default"
        return {
            "encoder": emb.get("encoder") or (cfg.get("encoder") or {}).get("name"),
            "weights": weights,
            "patch_px": emb.get("patch_px", geo.get("patch_px")),
            "size_um": emb.get("size_um", geo.get("size_um")),
            "scales": None if emb.get("scales") is None else [float(v) for v in np.ravel(emb["scales"])],
            "slide_mpp": {
                str(k): float(v) for k, v in (emb.get("slide_mpp") or {}).items() if isinstance(v, int | float)
            },
        }

    # -- running the networks ----------------------------------------------------------------------
    def _members(self, member: int | None) -> list[nn.Module]:
        if member is None:
            return self.nets
        if not -self.n_ensemble <= member < self.n_ensemble:
            raise IndexError(f"`member` must be in [0, {self.n_ensemble}), got {member}.")
        return [self.nets[member]]

    def _image_batch(self, batch: dict) -> torch.Tensor:
        x = batch["image"]
        if self.mode == "finetune":
            if self.preprocess is None:
                raise RuntimeError("This fine-tuned model has no image preprocessing.")
            return self.preprocess(x)
        return x

    def patch_source(self, adata, patches_key: str | None = None):
        """Return what a fine-tuned model's image branch reads of ``adata``: its spot patches (a method may override).

        ``patches_key`` ``None``: the key the model was trained with.
        """
        from ..pp import get_patches

        return get_patches(adata, key=patches_key or (self.config.get("patches") or {}).get("key", "patches"))

    def check_images(self, images: Any) -> None:
        """Raise unless ``images`` is what the image branch reads (features of the right width, or patches)."""
        if self.mode == "frozen":
            shape = getattr(images, "shape", None)
            if shape is None or len(shape) != 2 or shape[1] != self.config["feature_dim"]:
                raise ValueError(
                    f"The model reads frozen features of shape (n, {self.config['feature_dim']}), got {shape}."
                )
            if not np.isfinite(np.asarray(images)).all():
                raise ValueError("The image features contain NaN or infinite values.")
        elif not hasattr(images, "batch"):
            raise ValueError("A fine-tuned model reads patches (a patch source from hx.pp.get_patches).")

    def _run(self, fn, data, *, member, batch_size, device, desc) -> list[np.ndarray]:
        from ..train import infer

        nets = self._members(member)
        device = self.device if device is None else torch.device(device)
        outs = []
        for net in nets:
            net.to(device).eval()
            outs.append(infer(lambda b, net=net: fn(net, b), data, batch_size=batch_size, device=device, desc=desc))
        return outs

    def _run_images(self, fn, images, *, member=None, batch_size=256, device=None, desc="images"):
        self.check_images(images)
        return self._run(
            lambda net, b: fn(net, self._image_batch(b)),
            images,
            member=member,
            batch_size=batch_size,
            device=device,
            desc=desc,
        )

    # -- persistence -------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the model folder: ``config.json``, ``model.safetensors`` (and ``arrays.safetensors``).

        No pickle: weights and arrays are safetensors, everything else JSON. An existing model folder is
        replaced only with ``overwrite=True``. Under torch.distributed only rank 0 writes (the weights are the
        same on every rank after :func:`histoexp.train.fit`); the other ranks return the path at once.
        """
        from .._distributed import is_main_process

        if not is_main_process():
            return Path(path)
        if self.n_ensemble == 1:
            weights = dict(self.net.state_dict())
        else:
            weights = {f"member{i}.{k}": v for i, net in enumerate(self.nets) for k, v in net.state_dict().items()}
        tensors = {"model": weights}
        if self.arrays:
            tensors["arrays"] = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in self.arrays.items()}
        return _io.save_folder(path, config=self.config, tensors=tensors, overwrite=overwrite)

    @classmethod
    def _encoder_from_config(cls, config: dict):
        """Rebuild the fine-tuned encoder's architecture (weights come from the model file)."""
        from .encoders import get_encoder

        spec = config["encoder"]
        enc = get_encoder(spec.get("key", spec["name"]), weights=None, **spec.get("kwargs", {}))
        return enc.module, enc.preprocess

    @classmethod
    def load(cls, path: str | os.PathLike, *, device=None) -> ExpressionModel:
        """Read a model folder written by :meth:`save` (weights read with safetensors only)."""
        config = _io.read_config(path)
        if config.get("method") != cls.method:
            raise ValueError(f"{path} holds a {config.get('method')!r} model, not a {cls.method!r} model.")
        missing = [k for k in ("genes", "mode", "n_ensemble") if k not in config]
        if missing:
            raise ValueError(f"{path}/config.json lacks {missing}: not a complete histoexp model folder.")
        state = _io.read_tensors(path, "model")  # verifies the weights and that they were saved with this config
        n_members = config["n_ensemble"]
        if isinstance(n_members, bool) or not isinstance(n_members, int) or n_members < 1:
            raise ValueError(f"{path}/config.json: 'n_ensemble' is {n_members!r}, not a positive integer; save again.")
        if config["mode"] not in ("frozen", "finetune"):
            raise ValueError(f"{path}/config.json: 'mode' is {config['mode']!r}, not 'frozen' or 'finetune'.")
        nets, preprocess = [], None
        for i in range(n_members):
            encoder = None
            if config["mode"] == "finetune":
                encoder, preprocess = cls._encoder_from_config(config)
            try:
                net = cls.build_net(config, encoder)
            except (KeyError, TypeError, ValueError) as err:
                raise ValueError(
                    f"{path}/config.json does not describe a {cls.method!r} model ({type(err).__name__}: {err}): it "
                    "was edited, relabelled to another method, or written by an incompatible histoexp; save again."
                ) from err
            if n_members == 1:
                part = state
            else:
                prefix = f"member{i}."
                part = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            try:
                net.load_state_dict(part)
            except RuntimeError as err:
                raise ValueError(
                    f"{path}: the weights do not match config.json (member {i}); the folder was edited or mixed "
                    f"with another model's files. {str(err).splitlines()[0]}"
                ) from err
            nets.append(net)
        arrays = None
        if "arrays.safetensors" in config.get("files", []):
            arrays = {k: v.numpy() for k, v in _io.read_tensors(path, "arrays").items()}
        model = cls(nets, config, preprocess=preprocess, arrays=arrays)
        model._check_loaded(path)
        if device is not None:
            model.to(device)
        return model

    def _check_loaded(self, path) -> None:
        """Consistency checks of a loaded folder (subclasses extend)."""


class RetrievalModel(ExpressionModel):
    """Image query -> reference spot embeddings -> aggregate reference expression.

    Subclasses' networks provide ``encode_image(x)`` and ``encode_reference(batch)`` (``batch``: a
    :class:`histoexp.train.SpotDataset` dict with ``expression`` and, when listed in
    ``reference_fields``, ``coords``). The training spots can be kept as the default reference
    (``arrays['reference_expression']`` and ``arrays['reference_coords']``).
    """

    kind = "retrieval"
    #: What the spot branch reads of a reference spot besides expression (``'coords'``).
    reference_fields: ClassVar[tuple[str, ...]] = ()
    #: Retrieval defaults of the method (``hx.tl.impute`` uses them when ``k``/``method`` are not given).
    retrieval_defaults: ClassVar[dict] = {"k": 50, "method": "average"}

    @property
    def reference(self) -> ReferenceSpots | None:
        """The training spots kept with the model (``None`` when not kept)."""
        if "reference_expression" not in self.arrays:
            return None
        return ReferenceSpots(self.arrays["reference_expression"], self.arrays.get("reference_coords"))

    def _repr_extra(self) -> str:
        ref = self.reference
        return f", reference={'none' if ref is None else len(ref)} spots"

    def reference_positions(self, adata) -> np.ndarray:
        """Positions of a reference AnnData's spots for ``reference_fields`` ``'coords'``.

        Default: ``obsm[config['coords_key']]`` (``'spatial'``); a method overrides this to read positions
        its own way.
        """
        key = self.config.get("coords_key", "spatial")
        if key not in adata.obsm:
            raise KeyError(f"A reference lacks obsm[{key!r}] (spot positions the model's spot branch reads).")
        pos = np.asarray(adata.obsm[key], dtype=np.float32)[:, :2]
        if not np.isfinite(pos).all():
            raise ValueError(f"A reference has NaN or infinite positions in obsm[{key!r}].")
        return pos

    @staticmethod
    def join(parts: list[np.ndarray]) -> np.ndarray:
        """Join member embeddings: one as it is; several L2-normalised, concatenated, / sqrt(n).

        The cosine similarity of two joined embeddings is then the mean of the members' cosines.
        """
        if len(parts) == 1:
            return parts[0]
        scale = np.sqrt(len(parts))
        normed = [p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12) / scale for p in parts]
        return np.concatenate(normed, axis=1).astype(np.float32)

    def encode_images(self, images: Any, *, batch_size: int = 256, device=None, member: int | None = None):
        """Image embeddings (an ensemble's joined by :meth:`join`; ``member=i``: member ``i``'s raw ones).

        Parameters
        ----------
        images
            Frozen features ``(n, feature_dim)``, or a patch source for a fine-tuned model.
        batch_size
            Spots per forward pass.
        device
            Device for the computation (``None``: where the weights are).
        member
            Ensemble member (``None``: all, joined).
        """
        outs = self._run_images(
            lambda net, x: net.encode_image(x),
            images,
            member=member,
            batch_size=batch_size,
            device=device,
            desc="image embeddings",
        )
        return self.join(outs)

    def encode_reference(
        self, spots: ReferenceSpots | np.ndarray, *, batch_size: int = 4096, device=None, member: int | None = None
    ) -> np.ndarray:
        """Embeddings of reference spots (ensembles and ``member`` as in :meth:`encode_images`)."""
        from ..train import SpotDataset

        if not isinstance(spots, ReferenceSpots):
            spots = ReferenceSpots(spots)
        if spots.expression.shape[1] != len(self.genes):
            raise ValueError(
                f"Reference expression must have {len(self.genes)} columns (the model genes), "
                f"got {spots.expression.shape[1]}."
            )
        if "coords" in self.reference_fields and spots.coords is None:
            raise ValueError(f"The {self.method} spot branch needs the reference spots' coordinates.")
        coords = spots.coords if "coords" in self.reference_fields else None
        data = SpotDataset(expression=spots.expression, coords=coords)
        outs = self._run(
            lambda net, b: net.encode_reference(b),
            data,
            member=member,
            batch_size=batch_size,
            device=device,
            desc="reference embeddings",
        )
        return self.join(outs)

    def encode_expression(self, expr: np.ndarray, **kwargs) -> np.ndarray:
        """Embeddings of reference expression alone (:meth:`encode_reference` without positions)."""
        return self.encode_reference(ReferenceSpots(expr), **kwargs)


class RegressionModel(ExpressionModel):
    """Image -> expression directly; an ensemble averages its members' predictions.

    Subclasses' networks provide ``predict(x) -> (B, n_genes)``.
    """

    kind = "regression"

    def predictable(self, genes: list[str]) -> list[str]:
        """Return the subset of ``genes`` this model cannot predict (default: those outside its training genes)."""
        known = set(self.genes)
        return [g for g in genes if g not in known]

    def _unpredictable(self) -> str:
        """Why :meth:`predictable` refuses genes (for the error message)."""
        return (
            f"they are not among its {len(self.genes)} training genes (model.genes), and a {self.method} model "
            "predicts only those. Fit it with these genes (`genes=`), or use hx.tl.fit_zeroshot, which predicts genes "
            "outside training from gene embeddings."
        )

    def predict(
        self,
        images: Any,
        *,
        genes: list[str] | None = None,
        batch_size: int = 256,
        device=None,
        member: int | None = None,
    ):
        """Predicted expression ``(n, len(genes))`` (``genes``: default the training genes).

        The networks' raw output (an ensemble's mean; ``member=i``: member ``i`` alone): the reduced-rank
        projection and smoothing of :func:`histoexp.tl.impute` are not applied here.
        """
        genes = self.genes if genes is None else list(genes)
        unknown = self.predictable(genes)
        if unknown:
            raise KeyError(
                f"{len(unknown)} genes cannot be predicted by this model (e.g. {unknown[:5]}): {self._unpredictable()}"
            )
        pos = {g: i for i, g in enumerate(self.genes)}
        cols = torch.as_tensor([pos[g] for g in genes])
        outs = self._run_images(
            lambda net, x: net.predict(x)[:, cols.to(x.device)],
            images,
            member=member,
            batch_size=batch_size,
            device=device,
            desc="prediction",
        )
        return np.mean(outs, axis=0).astype(np.float32) if len(outs) > 1 else outs[0]
