"""GPT2MoEForCausalLM: losses, router gradients, save/load, generate, gradient checkpointing."""

import pytest
import torch
from conftest import tiny_gpt2_config
from transformers import AutoConfig, AutoModelForCausalLM, GPT2LMHeadModel

from moe_emergence import GPT2MoEConfig, GPT2MoEForCausalLM, MoEConfig, upcycle
from moe_emergence.losses import load_balance_loss, z_loss


def test_loss_is_weighted_sum_and_aux_losses_are_layer_means(dense_model, input_ids):
    cfg = MoEConfig(num_experts=4, top_k=2, layers=[0, 2], lb_coef=0.3, z_coef=0.05, router_init_std=0.5)
    moe = upcycle(dense_model, cfg).eval()
    out = moe(input_ids, labels=input_ids)
    dense_loss = dense_model(input_ids, labels=input_ids).loss
    assert torch.allclose(out.lm_loss, dense_loss, atol=1e-5)
    routers = out.router_outputs
    assert sorted(routers) == [0, 2]
    assert [t.data_ptr() for t in out.router_logits] == [r.router_logits.data_ptr() for r in routers.values()]
    lb = torch.stack([load_balance_loss(r.router_probs, r.topk_indices, 4) for r in routers.values()]).mean()
    z = torch.stack([z_loss(r.router_logits) for r in routers.values()]).mean()
    assert torch.allclose(out.aux_loss, lb) and torch.allclose(out.z_loss, z)
    assert torch.allclose(out.loss, out.lm_loss + 0.3 * lb + 0.05 * z)
    assert moe(input_ids).loss is None
    lm_only = moe(input_ids, labels=input_ids, output_router_logits=False)  # as HF's MoE models
    assert (
        torch.equal(lm_only.loss, lm_only.lm_loss)
        and lm_only.aux_loss is None
        and lm_only.router_logits is None
    )


def test_padding_does_not_count_in_aux_losses(dense_model):
    moe = upcycle(dense_model, MoEConfig(num_experts=4, router_init_std=0.5)).eval()
    ids = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0
    padded = ids.clone()
    padded[1, 5:] = 7
    out_a = moe(padded, attention_mask=mask)
    mask_b = mask.clone()
    out_b_ids = padded.clone()
    out_b_ids[1, 5:] = 50  # other garbage in the padded positions
    out_b = moe(out_b_ids, attention_mask=mask_b)
    assert torch.allclose(out_a.aux_loss, out_b.aux_loss) and torch.allclose(out_a.z_loss, out_b.z_loss)


def _router_grads(moe, input_ids):
    moe.zero_grad()
    moe(input_ids, labels=input_ids).lm_loss.backward()
    return [layer.router.weight.grad for layer in moe.moe_layers().values()]


def test_straight_through_top1_gives_router_gradient_from_lm_loss_alone(dense_model, input_ids):
    cfg = MoEConfig(num_experts=4, top_k=1, straight_through=True, noise_std=0.0, router_init_std=0.5)
    moe = upcycle(dense_model, cfg).train()
    grads = _router_grads(moe, input_ids)
    assert all(g is not None and g.abs().max() > 1e-6 for g in grads)


def test_identical_experts_with_renormalised_weights_give_router_zero_lm_gradient(dense_model, input_ids):
    """The trap: copies + weights summing to 1 => output independent of the router => zero gradient."""
    st_cfg = MoEConfig(num_experts=4, top_k=1, straight_through=True, noise_std=0.0, router_init_std=0.5)
    st_scale = max(
        g.abs().max().item() for g in _router_grads(upcycle(dense_model, st_cfg).train(), input_ids)
    )
    for k, st in [(2, False), (4, False), (1, False)]:
        cfg = MoEConfig(
            num_experts=4,
            top_k=k,
            straight_through=st,
            normalize_topk=True,
            noise_std=0.0,
            router_init_std=0.5,
        )
        grads = _router_grads(upcycle(dense_model, cfg).train(), input_ids)
        # exactly zero in exact arithmetic; float32 rounding leaves < 1e-6 of the straight-through gradient
        assert all(g.abs().max().item() <= 1e-6 * st_scale for g in grads), k
    # ... but the aux losses, or symmetry-breaking inits, do move it
    cfg = MoEConfig(num_experts=4, top_k=2, straight_through=False, noise_std=0.0, router_init_std=0.5)
    moe = upcycle(dense_model, cfg).train()
    moe(input_ids, labels=input_ids).aux_loss.backward()
    assert moe.transformer.h[0].mlp.router.weight.grad.abs().max() > 1e-6
    cfg = MoEConfig(num_experts=4, top_k=2, straight_through=False, init="noise", init_noise_std=0.5)
    grads = _router_grads(upcycle(dense_model, cfg).train(), input_ids)
    assert all(g.abs().max().item() > 1e-4 * st_scale for g in grads)


def test_save_load_roundtrip_is_exact_and_ties_embeddings(dense_model, input_ids, tmp_path):
    moe = upcycle(dense_model, MoEConfig(num_experts=3, top_k=2, layers=[1], init="noise")).eval()
    moe.set_router_step(17)
    moe.save_pretrained(tmp_path / "moe")
    assert (tmp_path / "moe" / "model.safetensors").exists()
    loaded = GPT2MoEForCausalLM.from_pretrained(tmp_path / "moe").eval()
    for (k, v), (k2, v2) in zip(moe.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2), k
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
    assert int(loaded.transformer.h[1].mlp.router.step) == 17
    assert loaded.config.moe == moe.config.moe
    assert torch.equal(loaded(input_ids).logits, moe(input_ids).logits)
    auto = AutoModelForCausalLM.from_pretrained(tmp_path / "moe")
    assert isinstance(auto, GPT2MoEForCausalLM)
    assert isinstance(AutoConfig.from_pretrained(tmp_path / "moe"), GPT2MoEConfig)


def test_generate_with_kv_cache_matches_full_recompute(dense_model):
    moe = upcycle(dense_model, MoEConfig(num_experts=4, top_k=2, init="noise", init_noise_std=0.5)).eval()
    prompt = torch.randint(1, 97, (2, 5), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(prompt)
    cached = moe.generate(prompt, attention_mask=mask, max_new_tokens=8, do_sample=False, use_cache=True)
    uncached = moe.generate(prompt, attention_mask=mask, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    seq = prompt
    for _ in range(8):
        nxt = moe(seq).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    assert torch.equal(cached, seq)


def test_gradient_checkpointing_gives_same_gradients_with_noise(dense_model, input_ids):
    cfg = MoEConfig(num_experts=4, top_k=2, noise_std=0.5, init="noise", lb_coef=0.1, z_coef=0.01)
    base = upcycle(dense_model, cfg).train()
    grads = []
    for checkpointing in (False, True):
        model = upcycle(dense_model, cfg).train()
        model.load_state_dict(base.state_dict())
        if checkpointing:
            model.activation_checkpointing_enable()
            assert model.is_gradient_checkpointing
        torch.manual_seed(123)
        model(input_ids, labels=input_ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert any("router" in n for n in grads[0])
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5), n


def test_set_router_step_reaches_every_router(dense_model):
    moe = upcycle(dense_model, MoEConfig(num_experts=2, noise_std=1.0, noise_anneal_steps=10))
    moe.set_router_step(5)
    assert all(int(layer.router.step) == 5 for layer in moe.moe_layers().values())
    assert all(
        layer.router.noise_std_now().item() == pytest.approx(0.5) for layer in moe.moe_layers().values()
    )


def test_set_experts_backend_reaches_every_bank_and_the_config(dense_model, input_ids, tmp_path):
    moe = upcycle(dense_model, MoEConfig(num_experts=2, noise_std=0.0)).eval()
    with torch.no_grad():
        ref = moe(input_ids).logits
    moe.set_experts_backend("grouped_mm")
    assert moe.config.moe.backend == "grouped_mm"
    assert {layer.experts.backend for layer in moe.moe_layers().values()} == {"grouped_mm"}
    moe.set_experts_backend("eager")
    with torch.no_grad():
        assert torch.equal(moe(input_ids).logits, ref)
    with pytest.raises(ValueError, match="'fast'; allowed: auto, eager, grouped_mm, triton"):
        moe.set_experts_backend("fast")
    assert moe.config.moe.backend == "eager"  # a refused name changes nothing


def test_routing_travels_as_arguments_not_module_state(dense_model, input_ids):
    """The mask goes in as an argument and router outputs come back with the forward's output; no module
    keeps a tensor of a forward (a second forward cannot change the first one's outputs)."""
    moe = upcycle(dense_model, MoEConfig(num_experts=2, router_init_std=0.5)).eval()
    first = moe(input_ids).router_outputs
    second = moe(input_ids[:, :3]).router_outputs
    assert first[0].router_logits.shape[0] == input_ids.numel() and second[0].router_logits.shape[
        0
    ] == 3 * len(input_ids)
    for module in moe.modules():
        for name, value in vars(module).items():
            if name.startswith("_"):
                continue
            assert not isinstance(value, torch.Tensor), f"{type(module).__name__}.{name} holds a tensor"
    layer = moe.moe_layers()[0]
    x = torch.randn(2, 5, layer.router.d_model)
    y, r = layer(x, torch.tensor([1, 1, 1, 0, 0, 1, 1, 1, 1, 1]))
    assert y.shape == x.shape and r.topk_indices.shape == (10, 1)
    with pytest.raises(ValueError, match="mask has shape"):
        layer(x, torch.ones(3))


def test_bf16_autocast_forward_keeps_routing_in_float32(dense_model, input_ids):
    moe = upcycle(dense_model, MoEConfig(num_experts=4)).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = moe(input_ids, labels=input_ids)
    assert torch.isfinite(out.loss)
    for r in out.router_outputs.values():
        assert r.router_logits.dtype == torch.float32 and r.topk_weights.dtype == torch.float32


def _no_dropout_moe(backend: str = "eager") -> GPT2MoEForCausalLM:
    """conftest's tiny GPT-2 (no dropout) upcycled, router noise off, in training mode."""
    torch.manual_seed(0)
    dense = GPT2LMHeadModel(tiny_gpt2_config(n_layer=2, n_positions=64))
    cfg = MoEConfig(num_experts=4, top_k=2, layers=[1], noise_std=0.0, backend=backend, init="noise")
    return upcycle(dense, cfg).train()


def test_training_forward_without_mask_skips_transformers_packed_sequence_search(monkeypatch):
    """Without a mask, position ids or a cache, transformers searches GPT-2's own arange position ids for packed
    sequences with a data-dependent check (a host sync on a GPU, every forward). The model gives GPT-2 an empty
    cache instead (``modeling._KeepNothingCache``): the search does not run, the loss and gradients are those of
    the forward that runs it (explicit arange position ids), and nothing is cached or returned. Position ids
    the user gives are searched and packed sequences honoured; a forward that builds a cache builds a real one."""
    import transformers.masking_utils as masking

    search = masking.find_packed_sequence_indices
    calls = []
    monkeypatch.setattr(masking, "find_packed_sequence_indices", lambda p: calls.append(p) or search(p))
    model = _no_dropout_moe()
    ids = torch.randint(0, 97, (3, 16), generator=torch.Generator().manual_seed(1))
    out = model(ids, labels=ids)
    assert calls == [] and out.past_key_values is None
    grads = torch.autograd.grad(out.loss, list(model.parameters()), allow_unused=True)
    ref = model(ids, labels=ids, position_ids=torch.arange(16)[None].expand(3, -1))
    assert len(calls) == 1  # the user's position ids may be packed: they are searched, as transformers does
    ref_grads = torch.autograd.grad(ref.loss, list(model.parameters()), allow_unused=True)
    assert torch.equal(out.logits, ref.logits) and torch.equal(out.loss, ref.loss)
    for g, r in zip(grads, ref_grads, strict=True):
        assert (g is None and r is None) or torch.equal(g, r)
    packed = torch.cat([torch.arange(8), torch.arange(8)])[None].expand(3, -1)  # two sequences per row
    second_alone = model(ids[:, 8:]).logits  # the second sequence sees none of the first one
    torch.testing.assert_close(model(ids, position_ids=packed).logits[:, 8:], second_alone)
    model.eval()  # eval, no labels, use_cache left to the config (true): transformers' own cache, filled
    calls.clear()
    assert len(model(ids).past_key_values) > 0 and calls == []
    model.config.use_cache = False  # ... and with the config's use_cache false: no cache, no search
    assert model(ids).past_key_values is None and calls == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["grouped_mm", "triton"])
def test_training_step_has_no_host_sync(backend):
    """A training forward + backward without padding queues everything on the device: no host sync (the
    packed-sequence search transformers would otherwise run, routing, experts, the objective)."""
    from moe_emergence.kernels import available_backends

    model = _no_dropout_moe(backend).cuda()
    if backend not in available_backends(torch.device("cuda"), model.config.n_embd, model.config.n_inner):
        pytest.skip(f"{backend} does not run here")
    ids = torch.randint(0, 97, (3, 16), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, labels=ids).loss
        loss.backward()

    step()  # warm-up, as checked: autotuning and lazy initialisation may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
