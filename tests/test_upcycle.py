"""Upcycling: function preservation, init methods, refusal of non-GPT-2 sources."""

import copy

import pytest
import torch
from transformers import BertConfig

from moe_emergence import GPT2MoEForCausalLM, MoEConfig, upcycle

MLP_KEYS = ("c_fc.weight", "c_fc.bias", "c_proj.weight", "c_proj.bias")
BANK_KEYS = ("w1_EDF", "b1_EF", "w2_EFD", "b2_ED")


@pytest.mark.parametrize("layers", ["all", [1]])
@pytest.mark.parametrize(
    "routing",
    [
        dict(top_k=1, straight_through=True),
        dict(top_k=2, straight_through=False, normalize_topk=True),
        dict(top_k=4, normalize_topk=True),
    ],
)
def test_copy_init_preserves_the_dense_function(dense_model, input_ids, layers, routing):
    moe = upcycle(dense_model, MoEConfig(num_experts=4, layers=layers, router_init_std=1.0, **routing)).eval()
    with torch.no_grad():
        expected = dense_model(input_ids).logits
        got = moe(input_ids).logits
    assert (got - expected).abs().max().item() <= 1e-5
    n_moe = 3 if layers == "all" else 1
    assert len(moe.moe_layers()) == n_moe


def test_upcycle_from_folder_equals_from_model(dense_model, dense_checkpoint, input_ids):
    cfg = MoEConfig(num_experts=3, layers=[0, 2], init="noise", init_noise_std=0.1)
    a = upcycle(dense_model, cfg)
    b = upcycle(str(dense_checkpoint), cfg)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb), ka


def test_non_mlp_weights_copied(dense_model):
    moe = upcycle(dense_model, MoEConfig(num_experts=2, layers=[0]))
    dense_sd = dense_model.state_dict()
    for key, value in moe.state_dict().items():
        if key in dense_sd:
            assert torch.equal(value, dense_sd[key]), key
    assert moe.transformer.h[1].mlp.__class__.__name__ == "GPT2MLP"


def _bank(moe, i):
    b = moe.transformer.h[i].mlp.experts
    return b.w1_EDF, b.b1_EF, b.w2_EFD, b.b2_ED


def test_copy_experts_are_exact_copies_in_conv1d_layout(dense_model):
    moe = upcycle(dense_model, MoEConfig(num_experts=3, init="copy"))
    for i, block in enumerate(dense_model.transformer.h):
        dense = [getattr(block.mlp, k.split(".")[0]).get_parameter(k.split(".")[1]) for k in MLP_KEYS]
        for bank_param, dense_param in zip(_bank(moe, i), dense, strict=True):
            for e in range(3):
                assert torch.equal(bank_param[e], dense_param)


def test_noise_init_differs_by_stated_amount(dense_model):
    rel = 0.2
    moe = upcycle(dense_model, MoEConfig(num_experts=4, init="noise", init_noise_std=rel))
    w1 = dense_model.transformer.h[0].mlp.c_fc.weight
    bank_w1 = _bank(moe, 0)[0]
    for e in range(4):
        delta = bank_w1[e] - w1
        assert delta.std().item() == pytest.approx(rel * w1.std().item(), rel=0.1)
        assert delta.mean().abs().item() < 0.1 * rel * w1.std().item()
    assert not torch.equal(bank_w1[0], bank_w1[1])


def test_drop_init_redraws_exactly_the_stated_fraction_of_neurons(dense_model):
    ratio = 0.25
    moe = upcycle(dense_model, MoEConfig(num_experts=3, init="drop", drop_ratio=ratio))
    mlp = dense_model.transformer.h[2].mlp
    w1, b1, w2, b2 = _bank(moe, 2)
    F = mlp.c_fc.weight.shape[1]
    dropped_sets = []
    for e in range(3):
        col_changed = (w1[e] != mlp.c_fc.weight).any(0)
        row_changed = (w2[e] != mlp.c_proj.weight).any(1)
        bias_changed = b1[e] != mlp.c_fc.bias
        assert int(col_changed.sum()) == round(ratio * F)
        assert torch.equal(col_changed, row_changed) and torch.equal(col_changed, bias_changed)
        assert torch.equal(b2[e], mlp.c_proj.bias)
        dropped_sets.append(col_changed)
    assert not torch.equal(dropped_sets[0], dropped_sets[1])


def test_drop_init_redraw_statistics_follow_the_original():
    from moe_emergence.upcycle import _drop_neurons

    g = torch.Generator().manual_seed(0)
    w1 = torch.randn(64, 512, generator=g) * 0.3 + 0.05
    b1 = torch.randn(512, generator=g) * 0.1
    w2 = torch.randn(512, 64, generator=g) * 0.2 - 0.02
    n1, _, n2 = _drop_neurons(w1, b1, w2, 0.5, torch.Generator().manual_seed(1))
    cols = (n1 != w1).any(0)
    assert n1[:, cols].std().item() == pytest.approx(w1.std().item(), rel=0.05)
    assert n1[:, cols].mean().item() == pytest.approx(w1.mean().item(), abs=0.02)
    assert n2[cols].std().item() == pytest.approx(w2.std().item(), rel=0.05)


@pytest.mark.parametrize("init", ["copy", "noise", "drop"])
def test_same_seed_same_weights_other_seed_other_weights(dense_model, init):
    a = upcycle(dense_model, MoEConfig(num_experts=2, init=init, seed=7)).state_dict()
    b = upcycle(dense_model, MoEConfig(num_experts=2, init=init, seed=7)).state_dict()
    c = upcycle(dense_model, MoEConfig(num_experts=2, init=init, seed=8)).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    key = "transformer.h.0.mlp.experts.w1_EDF" if init != "copy" else "transformer.h.0.mlp.router.weight"
    assert not torch.equal(a[key], c[key])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("init", ["noise", "drop"])
def test_upcycle_on_gpu_gives_the_cpu_experts(dense_model, init):
    cfg = MoEConfig(num_experts=2, init=init, seed=3)
    cpu = upcycle(dense_model, cfg).state_dict()
    gpu = upcycle(copy.deepcopy(dense_model).cuda(), cfg).state_dict()
    for key, value in cpu.items():
        assert gpu[key].is_cuda and torch.allclose(gpu[key].cpu(), value, rtol=1e-5, atol=1e-7), key


def test_router_init_std(dense_model):
    moe = upcycle(dense_model, MoEConfig(num_experts=8, router_init_std=0.5))
    w = moe.transformer.h[0].mlp.router.weight
    assert w.std().item() == pytest.approx(0.5, rel=0.2)
    zero = upcycle(dense_model, MoEConfig(num_experts=8, router_init_std=0.0))
    assert zero.transformer.h[0].mlp.router.weight.abs().sum() == 0


def test_non_gpt2_checkpoint_is_refused(tmp_path):
    BertConfig(
        hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8
    ).save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match="'bert' checkpoint; only GPT-2"):
        upcycle(str(tmp_path / "bert"), MoEConfig())


def test_moe_source_is_refused(dense_model):
    moe = upcycle(dense_model, MoEConfig(num_experts=2))
    with pytest.raises(ValueError, match="already a GPT2MoEForCausalLM"):
        upcycle(moe, MoEConfig())
    with pytest.raises(TypeError, match="source must be"):
        upcycle(42, MoEConfig())


def test_layer_outside_model_refused_by_upcycle(dense_model):
    with pytest.raises(ValueError, match="MoEConfig.layers"):
        upcycle(dense_model, MoEConfig(layers=[0, 5]))


def test_model_from_config_has_random_distinct_experts(dense_model):
    moe = upcycle(dense_model, MoEConfig(num_experts=2))
    for _ in range(3):  # uninitialised memory must never pass for an init
        fresh = GPT2MoEForCausalLM(moe.config)
        mlp = fresh.transformer.h[0].mlp
        w1, b1 = mlp.experts.w1_EDF, mlp.experts.b1_EF
        assert w1.std().item() == pytest.approx(moe.config.initializer_range, rel=0.2)
        assert w1.mean().abs().item() < 0.01 and torch.all(b1 == 0)
        assert not torch.equal(w1[0], w1[1])
        w2_std = moe.config.initializer_range / (2 * moe.config.n_layer) ** 0.5
        assert mlp.experts.w2_EFD.std().item() == pytest.approx(w2_std, rel=0.2)
        assert mlp.router.weight.std().item() == pytest.approx(moe.config.moe.router_init_std, rel=0.3)


def test_unreachable_hub_uses_the_local_cache_at_once(monkeypatch, tmp_path):
    """No network: hub ids load from the local cache or fail at once (transformers' offline message)
    instead of retrying for ~30 s; local folders are untouched."""
    import socket

    from moe_emergence.dense_checkpoint import hub_access

    def refuse(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(socket, "create_connection", refuse)
    assert hub_access("gpt2") == {"local_files_only": True}
    assert hub_access(tmp_path) == {}
    with pytest.raises(OSError, match="couldn't connect|cached files|offline"):
        upcycle("moe-emergence-test/no-such-model")


def test_missing_or_modelless_source_is_one_config_error(tmp_path):
    from moe_emergence.errors import ConfigError

    for src in (tmp_path / "nowhere", "./nowhere", "/no/such/folder"):
        with pytest.raises(ConfigError, match="no such folder"):
            upcycle(src, MoEConfig(num_experts=2))
    with pytest.raises(ConfigError, match="without config.json"):
        upcycle(tmp_path, MoEConfig(num_experts=2))
