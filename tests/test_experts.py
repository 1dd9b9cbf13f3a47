import pytest
import torch
from transformers.activations import ACT2FN

from moe_emergence.experts import ExpertBank, eager_experts


def per_token_reference(x, bank: ExpertBank, indices, weights):
    act = ACT2FN[bank.activation]
    y = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(indices.shape[1]):
            e = int(indices[t, k])
            h = act(x[t] @ bank.w1_EDF[e] + bank.b1_EF[e])
            y[t] += weights[t, k] * (h @ bank.w2_EFD[e] + bank.b2_ED[e])
    return y


@pytest.mark.parametrize("k", [1, 2, 3])
def test_eager_matches_per_token_loop(k):
    g = torch.Generator().manual_seed(k)
    E, D, F, T = 5, 7, 11, 13
    bank = ExpertBank(E, D, F)
    with torch.no_grad():
        for p in bank.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    x = torch.randn(T, D, generator=g)
    indices = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    indices[:, 0] = torch.where(indices[:, 0] == 4, 0, indices[:, 0])  # expert 4 may be empty for k=1
    weights = torch.rand(T, k, generator=g)
    assert torch.allclose(
        bank(x, indices, weights), per_token_reference(x, bank, indices, weights), atol=1e-5
    )


def test_every_expert_in_graph_even_without_tokens():
    bank = ExpertBank(4, 6, 8)
    torch.nn.init.normal_(bank.w1_EDF)
    torch.nn.init.normal_(bank.w2_EFD)
    x = torch.randn(5, 6, requires_grad=True)
    y = bank(x, torch.zeros(5, 1, dtype=torch.long), torch.ones(5, 1))
    y.sum().backward()
    for p in bank.parameters():
        assert p.grad is not None
    assert bank.w1_EDF.grad[1:].abs().sum() == 0 and bank.w1_EDF.grad[0].abs().sum() > 0


def test_empty_batch():
    bank = ExpertBank(3, 4, 5)
    torch.nn.init.normal_(bank.w1_EDF)
    y = eager_experts(
        torch.zeros(0, 4),
        *bank.parameters(),
        torch.zeros(0, 2, dtype=torch.long),
        torch.zeros(0, 2),
        "gelu_new",
    )
    assert y.shape == (0, 4)


def test_unknown_activation_and_backend_refused():
    with pytest.raises(ValueError, match="activation 'swishy'"):
        ExpertBank(2, 3, 4, activation="swishy")
    bank = ExpertBank(2, 3, 4, backend="nope")
    with pytest.raises(ValueError, match="backend 'nope'"):
        bank(torch.zeros(1, 3), torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1))
