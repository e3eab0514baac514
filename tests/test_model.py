import torch
from torch import nn

from kgmel_core.config import RetrieverConfig
from kgmel_core.retrieval.model import (
    GatedFusion,
    KGMELRetriever,
    SideBatch,
    TripleAttention,
    TripleEncoder,
    sparse_top_p_softmax,
)


def _identity(layer: nn.Linear) -> None:
    with torch.no_grad():
        layer.weight.copy_(torch.eye(layer.weight.shape[0], layer.weight.shape[1]))
        if layer.bias is not None:
            layer.bias.zero_()


def test_triple_encoder_is_tail_plus_mlp_of_tail_and_relation():
    enc = TripleEncoder(2, dropout=0.0)
    with torch.no_grad():
        first, last = enc.mlp[0], enc.mlp[3]
        first.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 1.0]]))  # picks tail[0] and relation[1]
        first.bias.zero_()
        _identity(last)
    tail, relation = torch.tensor([[2.0, 5.0]]), torch.tensor([[7.0, -3.0]])
    # MLP([tail; rel]) = LeakyReLU([2, -3]) = [2, -0.03]; x_rt = tail + that = [4, 4.97]
    assert torch.allclose(enc(relation, tail), torch.tensor([[4.0, 4.97]]))


def test_top_p_keeps_exactly_p_weights_among_real_triples():
    scores = torch.tensor([[5.0, 1.0, 4.0, 3.0, 9.0]])
    mask = torch.tensor([[True, True, True, True, False]])  # the 9.0 is padding
    weights = sparse_top_p_softmax(scores, mask, p=2)
    assert (weights > 0).sum().item() == 2 and weights[0, 4] == 0
    expected = torch.softmax(torch.tensor([5.0, 4.0]), 0)
    assert torch.allclose(weights[0, [0, 2]], expected)
    assert torch.allclose(weights.sum(), torch.tensor(1.0))


def test_top_p_with_fewer_triples_than_p_and_with_none():
    scores = torch.tensor([[1.0, 2.0, 0.0], [3.0, 3.0, 3.0]])
    mask = torch.tensor([[True, True, False], [False, False, False]])
    weights = sparse_top_p_softmax(scores, mask, p=5)
    assert torch.allclose(weights[0], torch.tensor([0.2689414, 0.7310586, 0.0]), atol=1e-6)
    assert torch.equal(weights[1], torch.zeros(3))  # no triples: zeros, not NaN


def test_attention_scores_mix_image_and_head_queries_by_beta():
    att = TripleAttention(2, beta=0.25, temperature=0.5, top_p=2)
    for layer in (att.q_image, att.q_head, att.k, att.v, att.out):
        _identity(layer)
    head, image = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    triples = torch.tensor([[[1.0, 1.0], [2.0, 0.0]]])
    s = att.scores(head, image, torch.tensor([True]), triples)
    scale = 2**0.5
    # triple 0: img.k = 2, head.k = 1 ; triple 1: img.k = 0, head.k = 2
    expected = torch.tensor([[0.25 * 2 / scale + 0.75 * 1 / scale, 0.75 * 2 / scale]]) / 0.5
    assert torch.allclose(s, expected)
    no_image = att.scores(head, image, torch.tensor([False]), triples)
    assert torch.allclose(no_image, torch.tensor([[1 / scale, 2 / scale]]) / 0.5)  # beta falls to 0
    out = att(head, image, torch.tensor([True]), triples, torch.tensor([[True, True]]))
    w = torch.softmax(expected[0], 0)
    assert torch.allclose(out, (w[0] * triples[0, 0] + w[1] * triples[0, 1]).unsqueeze(0))


def test_padded_triples_do_not_change_attention_output():
    torch.manual_seed(0)
    att = TripleAttention(4, beta=0.6, temperature=0.1, top_p=5)
    head, image = torch.randn(1, 4), torch.randn(1, 4)
    real = torch.randn(1, 2, 4)
    padded = torch.cat([real, torch.randn(1, 3, 4) * 100], dim=1)
    mask = torch.tensor([[True, True, False, False, False]])
    a = att(head, image, torch.tensor([True]), real, torch.tensor([[True, True]]))
    b = att(head, image, torch.tensor([True]), padded, mask)
    assert torch.allclose(a, b, atol=1e-6)


def test_gated_fusion_matches_hand_computation_and_gates_are_in_0_1():
    fusion = GatedFusion(2)
    for layer in (fusion.w_triple, fusion.w_head, fusion.w_image, fusion.g_head, fusion.g_image):
        _identity(layer)
    head, image, triple = torch.tensor([[1.0, -1.0]]), torch.tensor([[2.0, 0.0]]), torch.tensor([[0.5, 0.5]])
    z = fusion(head, image, torch.tensor([True]), triple)
    expected = triple + head * torch.sigmoid(head) + image * torch.sigmoid(image)
    assert torch.allclose(z, expected)
    gates = fusion.gate(fusion.g_head, torch.randn(100, 2) * 50)
    assert bool(((gates >= 0) & (gates <= 1)).all())
    no_image = fusion(head, image, torch.tensor([False]), triple)
    assert torch.allclose(no_image, triple + head * torch.sigmoid(head))
    ungated = GatedFusion(2, use_gate=False)
    assert torch.equal(ungated.gate(ungated.g_head, head), torch.ones_like(head))


def _batch(b=3, t=4, d=6, triples=True):
    torch.manual_seed(1)
    mask = torch.zeros(b, t, dtype=torch.bool)
    if triples:
        mask[0, :2] = True
    return SideBatch(
        torch.randn(b, d),
        torch.randn(b, 5),
        torch.tensor([True, False, True]),
        torch.randn(b, t, d),
        torch.randn(b, t, d),
        mask,
    )


def test_retriever_outputs_unit_vectors_without_nan_for_entities_without_triples():
    model = KGMELRetriever(6, 5, RetrieverConfig(hidden_dim=8)).eval()
    z = model(_batch())
    assert z.shape == (3, 8) and not torch.isnan(z).any()
    assert torch.allclose(z.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_ablation_switches_remove_their_modality():
    batch = _batch()
    no_triples = KGMELRetriever(6, 5, RetrieverConfig(hidden_dim=8, use_triples=False)).eval()
    changed = SideBatch(
        batch.head, batch.image, batch.image_mask, batch.relation * 3, batch.tail * 3, batch.triple_mask
    )
    assert torch.allclose(no_triples(batch), no_triples(changed))
    no_image = KGMELRetriever(6, 5, RetrieverConfig(hidden_dim=8, use_image=False)).eval()
    other_image = SideBatch(
        batch.head, batch.image * -2, batch.image_mask, batch.relation, batch.tail, batch.triple_mask
    )
    assert torch.allclose(no_image(batch), no_image(other_image))
    full = KGMELRetriever(6, 5, RetrieverConfig(hidden_dim=8)).eval()
    assert not torch.allclose(full(batch)[0], full(other_image)[0])
    assert torch.allclose(full(batch)[1], full(other_image)[1])  # row 1 has no image: unaffected
