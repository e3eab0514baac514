from dataclasses import replace

import torch
from torch import nn

from kgmel_core.config import RetrieverConfig
from kgmel_core.retrieval.model import (
    GatedFusion,
    KGMELRetriever,
    SideBatch,
    TripleAttention,
    TripleEncoder,
    optimizer_groups,
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
    pair = torch.arange(2).reshape(1, 2)
    s = att.scores(head, image, torch.tensor([True]), att.k(triples[0]), pair)
    scale = 2**0.5
    # triple 0: img.k = 2, head.k = 1 ; triple 1: img.k = 0, head.k = 2
    expected = torch.tensor([[0.25 * 2 / scale + 0.75 * 1 / scale, 0.75 * 2 / scale]]) / 0.5
    assert torch.allclose(s, expected)
    no_image = att.scores(head, image, torch.tensor([False]), att.k(triples[0]), pair)
    assert torch.allclose(no_image, torch.tensor([[1 / scale, 2 / scale]]) / 0.5)  # beta falls to 0
    out = att(head, image, torch.tensor([True]), triples[0], pair, torch.tensor([[True, True]]))
    w = torch.softmax(expected[0], 0)
    assert torch.allclose(out, (w[0] * triples[0, 0] + w[1] * triples[0, 1]).unsqueeze(0))


def test_padded_triples_do_not_change_attention_output():
    torch.manual_seed(0)
    att = TripleAttention(4, beta=0.6, temperature=0.1, top_p=5)
    head, image = torch.randn(1, 4), torch.randn(1, 4)
    real = torch.randn(1, 2, 4)
    padded = torch.cat([real, torch.randn(1, 3, 4) * 100], dim=1)
    mask = torch.tensor([[True, True, False, False, False]])
    a = att(head, image, torch.tensor([True]), real[0], torch.arange(2).reshape(1, 2), torch.tensor([[True, True]]))
    b = att(head, image, torch.tensor([True]), padded[0], torch.arange(5).reshape(1, 5), mask)
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
    return SideBatch.dense(
        torch.randn(b, d),
        torch.randn(b, 5),
        torch.tensor([True, False, True]),
        torch.randn(b, t, d),
        torch.randn(b, t, d),
        mask,
    )


def test_retriever_outputs_unit_vectors_without_nan_for_entities_without_triples():
    model = KGMELRetriever(6, 5, RetrieverConfig(hidden_dim=8, init="paper")).eval()
    z = model(_batch())
    assert z.shape == (3, 16) and not torch.isnan(z).any()  # fused half + name half
    assert torch.allclose(z.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_ablation_switches_remove_their_modality():
    batch = _batch()
    no_triples = KGMELRetriever(6, 5, RetrieverConfig(hidden_dim=8, use_triples=False, init="paper")).eval()
    changed = replace(batch, pair_relation=batch.pair_relation * 3, pair_tail=batch.pair_tail * 3)
    assert torch.allclose(no_triples(batch), no_triples(changed))
    no_image = KGMELRetriever(6, 5, RetrieverConfig(hidden_dim=8, use_image=False, init="paper")).eval()
    other_image = replace(batch, image=batch.image * -2)
    assert torch.allclose(no_image(batch), no_image(other_image))
    full = KGMELRetriever(6, 5, RetrieverConfig(hidden_dim=8, init="paper")).eval()
    assert not torch.allclose(full(batch)[0], full(other_image)[0])
    assert torch.allclose(full(batch)[1], full(other_image)[1])  # row 1 has no image: unaffected


def test_residual_init_starts_at_the_zero_shot_head_text():
    batch = _batch(d=8)
    model = KGMELRetriever(8, 5, RetrieverConfig(hidden_dim=8, use_name=False)).eval()
    assert torch.allclose(model(batch), torch.nn.functional.normalize(batch.head, dim=-1), atol=1e-6)


def test_reference_top_p_zeroes_the_rest_of_a_full_softmax_without_renormalising():
    scores = torch.tensor([[5.0, 1.0, 4.0, 3.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    weights = sparse_top_p_softmax(scores, mask, p=2, renormalize=False)
    full = torch.softmax(scores[0], 0)
    assert torch.allclose(weights[0], torch.tensor([full[0], 0.0, full[2], 0.0]))
    assert weights.sum() < 1


def test_packed_pairs_give_the_same_vectors_as_one_pair_per_slot():
    torch.manual_seed(3)
    model = KGMELRetriever(6, 5, RetrieverConfig(hidden_dim=8, init="paper")).eval()
    pair_relation, pair_tail = torch.randn(3, 6), torch.randn(3, 6)
    triple_pair = torch.tensor([[0, 1, 2], [2, 2, 0]])  # row 1 repeats pair 2
    mask = torch.tensor([[True, True, True], [True, True, False]])
    head, image, image_mask = torch.randn(2, 6), torch.randn(2, 5), torch.tensor([True, False])
    packed = SideBatch(head, head, image, image_mask, pair_relation, pair_tail, triple_pair, mask)
    dense = SideBatch.dense(head, image, image_mask, pair_relation[triple_pair], pair_tail[triple_pair], mask)
    assert torch.allclose(model(packed), model(dense), atol=1e-6)


def test_no_weight_decay_on_biases_and_gates():
    model = KGMELRetriever(6, 5, RetrieverConfig(hidden_dim=8))
    decay, no_decay = optimizer_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.dim() == 2 and ".g_" not in names[id(p)] for p in decay["params"])
    undecayed = {names[id(p)] for p in no_decay["params"]}
    assert undecayed >= {"fusion.g_head.weight", "fusion.g_head.bias", "proj_head.bias"}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0


def test_name_view_switch():
    batch = _batch()
    batch = replace(batch, name=torch.randn(3, 6))
    other_name = replace(batch, name=batch.name * -3)
    without = KGMELRetriever(6, 5, RetrieverConfig(hidden_dim=8, use_name=False, init="paper")).eval()
    assert torch.allclose(without(batch), without(other_name))
    with_name = KGMELRetriever(6, 5, RetrieverConfig(hidden_dim=8, init="paper")).eval()
    assert not torch.allclose(with_name(batch), with_name(other_name))
    unit = torch.nn.functional.normalize
    wide = _batch(d=8)
    wide = replace(wide, head=unit(wide.head, dim=-1), name=unit(torch.randn(3, 8), dim=-1))  # encoders emit units
    residual = KGMELRetriever(8, 5, RetrieverConfig(hidden_dim=8)).eval()  # starts at [head; name]
    expected = torch.cat([wide.head, wide.name], -1) / 2**0.5
    assert torch.allclose(residual(wide), expected, atol=1e-6)
    assert residual.output_dim == 16 and without.output_dim == 8


def test_a_flipped_attention_sign_is_the_same_model_as_negated_query_projections():
    """Why no learning test can assert that flipping the score sign fails (README, issue 12): the
    queries are learned linear maps, so -scores under (W_q_head, W_q_image) equal the scores under
    (-W_q_head, -W_q_image); training reaches either, and a symmetric random start draws both alike."""
    torch.manual_seed(5)
    model = KGMELRetriever(6, 5, RetrieverConfig(hidden_dim=8, top_p=2, init="paper")).eval()
    mask = torch.tensor([[True, True, True, True], [True, True, False, False], [True, True, True, False]])
    batch = SideBatch.dense(torch.randn(3, 6), torch.randn(3, 5), torch.tensor([True, False, True]),
                            torch.randn(3, 4, 6), torch.randn(3, 4, 6), mask)
    original = model(batch)
    scores = model.attention.scores
    model.attention.scores = lambda *args, **kwargs: -scores(*args, **kwargs)
    flipped = model(batch)
    assert not torch.allclose(flipped, original, atol=1e-3)  # the flip alone picks other triples
    with torch.no_grad():
        model.attention.q_head.weight.neg_()
        model.attention.q_image.weight.neg_()
    assert torch.allclose(model(batch), original, atol=1e-6)  # ... and -W_q undoes it exactly
