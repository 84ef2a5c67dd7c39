"""The fitted siamese-attention model (:class:`FittedModel`): predictions, embeddings,
relevance and activation counts, and its persistence (:meth:`FittedModel.state` /
:meth:`FittedModel.from_state`). API: see :mod:`.train`.
"""

from __future__ import annotations

import numpy as np
import torch

from .attention import (
    AttentionClassifier,
    mask_counts,
    subject_relevance,
    weight_relevance,
)
from .attention_stage import region_feature_set
from .data import RegionDataset, RegionLayout, Standardizer, signature_text
from .geometry import RegionGrid, coarsen
from .losses import SIMILARITY_SCALE
from .numerics import _compute_dtype, _embed, _Inputs, _layout_key, _tf32
from .options import TrainConfig
from .siamese import PARAM_NAMES, SiameseArch, SiameseBank

FORMAT = "bids_siamfuse/siamese-attention"
FORMAT_VERSION = 2  # 2: fusion variants (per-region similarity features)


class FittedModel:
    """A trained siamese-attention model (see the module docstring for the API)."""

    def __init__(
        self,
        *,
        classes,
        standardizer: Standardizer,
        layout: RegionLayout,
        arch: SiameseArch,
        bank: SiameseBank,
        attention: AttentionClassifier,
        config: TrainConfig,
        history: list | None = None,
        info: dict | None = None,
    ):
        self.classes = tuple(classes)
        self.standardizer = standardizer
        self.layout = layout
        self.arch = arch
        self.bank = bank.eval()
        self.attention = attention.eval()
        self.config = config
        self.history = list(history or [])
        self.info = dict(info or {})
        self.device = bank.order.device
        self.dtype = _compute_dtype(self.device, config.amp)
        self._inputs = _Inputs(layout, arch, standardizer)
        self.fusion = getattr(config, "fusion", "paper")
        #: ablation name -> (attention module, feature set, "trained"/"untrained"); CV only
        self.ablation_heads: dict = {}
        self.init_bank: SiameseBank | None = None  # the networks at initialisation (ablations)

    # -- embeddings and predictions
    def _chunk(self) -> int:
        return 64 if self.device.type == "cuda" else 8

    @torch.no_grad()
    def _embeddings(self, data: RegionDataset, bank: SiameseBank | None = None) -> torch.Tensor:
        bank = self.bank if bank is None else bank
        outs = []
        step = 64
        with _tf32(self.device.type == "cuda", self.config.deterministic):
            for start in range(0, len(data), step):
                part = data.subset(np.arange(start, min(len(data), start + step)))
                xm, xp = self._inputs.tensors(part, self.device, self.dtype)
                outs.append(_embed(bank, xm, xp, self.dtype, self._chunk()))
        if not outs:
            return torch.empty(0, self.layout.n_regions, 2 * self.arch.embed, device=self.device)
        return torch.cat(outs)

    def embed(self, data: RegionDataset) -> np.ndarray:
        """(N, R, 40) float32: per region the MRI branch output (20), then PET's (20)."""
        return self._embeddings(data).cpu().numpy()

    def _features(self, data: RegionDataset) -> torch.Tensor:
        """The attention stage's input (N, R, F) for this model's fusion variant."""
        return region_feature_set(self._embeddings(data), self.fusion)[0]

    def similarity(self, data: RegionDataset) -> np.ndarray:
        """(N, R) per-region MRI-PET similarity (the scaled cosine the hinge loss trained)."""
        feats = region_feature_set(self._embeddings(data), "similarity_only")[0]
        return feats[..., 0].cpu().numpy()

    @torch.no_grad()
    def predict_proba(self, data: RegionDataset) -> np.ndarray:
        """(N, n_classes) class probabilities, columns in ``classes`` order."""
        logits = self.attention(self._features(data))
        return torch.softmax(logits, dim=-1).double().cpu().numpy()

    @torch.no_grad()
    def predict_ablations(self, data: RegionDataset) -> dict[str, np.ndarray]:
        """Ablation name -> (N, n_classes) probabilities (empty unless trained with
        ``ablations=True``; see ``ABLATIONS``)."""
        if not self.ablation_heads:
            return {}
        emb = {"trained": self._embeddings(data)}
        if self.init_bank is not None:
            emb["untrained"] = self._embeddings(data, self.init_bank)
        out = {}
        for name, (att, fset, nets) in self.ablation_heads.items():
            logits = att(region_feature_set(emb[nets], fset)[0])
            out[name] = torch.softmax(logits, dim=-1).double().cpu().numpy()
        return out

    def predict(self, data: RegionDataset) -> np.ndarray:
        """(N,) index of the most probable class."""
        return self.predict_proba(data).argmax(1)

    # -- relevance
    def relevance(self, source: str = "effective") -> dict[str, np.ndarray]:
        """Figure 7: ``mri``, ``pet``, ``combined``, each (R,), summing to 1 over regions.

        ``source="effective"``: the attention module's effective per-feature weights (mean
        mask x class-separating classifier weight); ``"first_layer"``: its first linear layer's
        ``|W|``. See :mod:`.attention` for both definitions and why the first is the default.
        """
        return weight_relevance(self.attention, source)

    def activation_counts(self, data: RegionDataset) -> dict[str, np.ndarray]:
        """Figure 6: ``mri``, ``pet``, ``fused`` counts, each (N, R) (see :mod:`.attention`)."""
        return mask_counts(self.attention, self._features(data))

    def subject_relevance(self, data: RegionDataset) -> dict[str, np.ndarray]:
        """Per-subject ``mri``, ``pet``, ``combined``, each (N, R) (see :mod:`.attention`)."""
        return subject_relevance(self.attention, self._features(data))

    # -- persistence
    def state(self) -> tuple[dict[str, np.ndarray], dict]:
        """Tensors (float32 numpy, atlas order; for safetensors) and JSON-able metadata."""
        tensors = {
            f"siamese.{k}": v.float().cpu().numpy() for k, v in self.bank.region_state().items()
        }
        for k, v in self.attention.state_dict().items():
            tensors[f"attention.{k}"] = v.detach().float().cpu().numpy()
        layout = self.layout
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "classes": list(self.classes),
            "reference_class": self.classes[0],
            "architecture": self.arch.to_dict(),
            "similarity": {"kind": "scaled_cosine", "scale": SIMILARITY_SCALE},
            "fusion": self.fusion,
            "attention": self.attention.config(),
            "config": self.config.to_dict(),
            "standardizer": self.standardizer.to_dict(),
            "geometry": {
                "grid_shape": [int(s) for s in layout.grid_shape],
                "n_voxels": int(layout.n_voxels),
                "boxes": layout.boxes.astype(int).tolist(),
                "region_names": list(layout.names),
                "downsample": self.arch.downsample,
            },
            "layout_signature": layout.signature,
            "history": self.history,
            "info": self.info,
            "torch_version": torch.__version__,
        }
        return tensors, meta

    @classmethod
    def from_state(
        cls, tensors: dict, meta: dict, layout: RegionLayout, device: str = "cpu"
    ) -> FittedModel:
        """Rebuild a model saved with :meth:`state`; refuses a layout that does not match."""
        if meta.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} model (format {meta.get('format')!r})")
        if meta.get("format_version", 0) > FORMAT_VERSION:
            raise ValueError(f"model format version {meta['format_version']} is too new")
        if signature_text(meta.get("layout_signature", {})) != _layout_key(layout):
            raise ValueError(
                "the model was trained on another atlas or grid (layout signature mismatch)"
            )
        geom = meta.get("geometry", {})
        if (
            geom.get("n_voxels") != layout.n_voxels
            or np.asarray(geom.get("boxes", [])).shape != np.asarray(layout.boxes).shape
            or not np.array_equal(np.asarray(geom.get("boxes")), layout.boxes)
        ):
            raise ValueError("the model's region boxes differ from this layout's")
        cfg = {k: v for k, v in meta["config"].items() if k in TrainConfig.__dataclass_fields__}
        cfg["device"] = device
        # version-1 bundles predate the fusion variants: they are the paper's
        cfg["fusion"] = meta.get("fusion", "paper")
        config = TrainConfig(**cfg)
        arch = SiameseArch.from_dict(meta["architecture"])
        dev = torch.device(device)
        grid = coarsen(RegionGrid.from_layout(layout), arch.downsample)[0]
        # the stored weights replace the initial ones: nothing to draw (125M values, 0.6 s)
        blank = {n: torch.zeros(shape) for n, shape in arch.shapes(grid.n_regions).items()}
        bank = SiameseBank(grid, arch, uniforms=blank)
        bank.deterministic = config.deterministic
        bank.load_region_state(
            {n: torch.as_tensor(np.asarray(tensors[f"siamese.{n}"])) for n in PARAM_NAMES}
        )
        with torch.random.fork_rng(devices=[]):
            att = AttentionClassifier(**meta["attention"])
        att.load_state_dict(
            {
                k[len("attention.") :]: torch.as_tensor(np.asarray(v))
                for k, v in tensors.items()
                if k.startswith("attention.")
            }
        )
        return cls(
            classes=meta["classes"],
            standardizer=Standardizer.from_dict(meta["standardizer"]),
            layout=layout,
            arch=arch,
            bank=bank.to(dev),
            attention=att.to(dev),
            config=config,
            history=meta.get("history", []),
            info=meta.get("info", {}),
        )
