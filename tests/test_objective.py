"""The MoE objective has one owner (``losses.moe_objective``): the model's forward and the trainer use it,
each router term is computed once per forward, and the block that passes routing data as arguments
computes exactly GPT-2's block."""

from __future__ import annotations

import warnings

import pytest
import torch
from test_training_run import TINY
from transformers import GPT2LMHeadModel

from moe_emergence import MoEConfig, losses, upcycle
from moe_emergence.losses import LossCoefs, Shares, moe_objective
from moe_emergence.modeling import GPT2MoEBlock
from moe_emergence.training.steps import (
    MoEStep,
    StepSums,
    has_padding,
    micro_batch_loss,
    shifted_token_counts,
)


def _count_calls(monkeypatch, invocations: dict[str, int] | None = None) -> dict[str, int]:
    """Wrap the router-term formulas in ``losses`` (what ``moe_objective`` calls) to count the per-layer values
    they compute (a call on ``[L, T, ...]`` computes L); ``invocations``, when given, counts the calls
    themselves. ``mean``: ``TokenWeights.mean``, each masked mean (P_i, z, entropy)."""
    calls = {"_load_balance_loss": 0, "_z_loss": 0, "mean": 0}
    for name in calls:
        owner = losses.TokenWeights if name == "mean" else losses
        original = getattr(owner, name)

        def counted(*args, _name=name, _f=original, **kwargs):
            out = _f(*args, **kwargs)
            calls[_name] += out.shape[0] if out.dim() else 1  # one value per layer
            if invocations is not None:
                invocations[_name] = invocations.get(_name, 0) + 1
            return out

        monkeypatch.setattr(owner, name, counted)
    return calls


def test_closed_form_objective_and_shares(dense_model, input_ids):
    """loss = w_lm * lm + w_batch * lb_coef * lb + w_tok * (z_coef * z + entropy_coef * entropy)."""
    moe = upcycle(dense_model, MoEConfig(num_experts=4, top_k=2, layers=[0, 2], router_init_std=0.5)).eval()
    out = moe(input_ids, labels=input_ids)
    routers = list(out.router_outputs.values())
    coefs = LossCoefs(lb_coef=0.3, z_coef=0.05, entropy_coef=-0.2)
    shares = Shares(lm=0.25, tokens=0.5, batch=0.125)
    obj = moe_objective(out.lm_loss, routers, None, 4, coefs, shares=shares)
    lb = torch.stack([losses.load_balance_loss(r.router_probs, r.topk_indices, 4) for r in routers]).mean()
    z = torch.stack([losses.z_loss(r.router_logits) for r in routers]).mean()
    ent = torch.stack([r.entropy.mean() for r in routers]).mean()
    expected = 0.25 * out.lm_loss + 0.125 * 0.3 * lb + 0.5 * (0.05 * z - 0.2 * ent)
    assert torch.allclose(obj.loss, expected) and obj.lb_loss_L.shape == (2,)
    # global counts replace f_i: all assignments on expert 0 gives E * P_0
    counts_LE = torch.tensor([[8.0, 0, 0, 0], [8.0, 0, 0, 0]])
    glob = moe_objective(out.lm_loss, routers, None, 4, coefs, tokens_per_expert_LE=counts_LE)
    assert torch.allclose(glob.lb_loss_L, torch.stack([4 * r.router_probs[:, 0].mean() for r in routers]))
    with pytest.raises(ValueError, match=r"expected \(2, 4\)"):
        moe_objective(out.lm_loss, routers, None, 4, coefs, tokens_per_expert_LE=torch.ones(3, 4))


def test_model_computes_each_term_once_per_forward(dense_model, input_ids, monkeypatch):
    moe = upcycle(dense_model, MoEConfig(num_experts=4, top_k=2, layers=[0, 2])).train()
    invocations: dict[str, int] = {}
    calls = _count_calls(monkeypatch, invocations)
    moe(input_ids, labels=input_ids)
    # one value per MoE layer; the masked means: P_i (inside the lb loss), z and the entropy
    assert calls == {"_load_balance_loss": 2, "_z_loss": 2, "mean": 6}
    assert invocations == {"_load_balance_loss": 1, "_z_loss": 1, "mean": 3}  # all layers in one call each
    calls.update(dict.fromkeys(calls, 0))
    moe(input_ids, labels=input_ids, output_router_logits=False)  # the trainer's call: LM loss only
    assert calls == {"_load_balance_loss": 0, "_z_loss": 0, "mean": 0}


def test_trainer_micro_batch_equals_model_objective(dense_model, input_ids):
    """One micro-batch on one process: the trainer's loss is the model's own loss (one formula)."""
    cfg = MoEConfig(num_experts=4, top_k=2, layers=[1], entropy_coef=0.1, router_init_std=0.5)
    moe = upcycle(dense_model, cfg).eval()
    mask = torch.ones_like(input_ids)
    mask[1, 5:] = 0
    batch = {"input_ids": input_ids, "attention_mask": mask, "labels": input_ids.masked_fill(mask == 0, -100)}
    model_loss = moe(**batch).loss
    out = moe(**batch, output_router_logits=False)
    step = MoEStep([1], 4, cfg.loss_coefs(), None, False)
    sums = StepSums(1, torch.device("cpu"))
    loss = micro_batch_loss(out, batch, shifted_token_counts(batch), 1.0, step, sums)
    assert torch.allclose(loss, model_loss)
    assert sums.totals[4].item() == pytest.approx(model_loss.item())  # train/loss is this objective


def test_no_mask_equals_an_all_ones_mask(dense_model, input_ids):
    """The trainer passes ``attention_mask=None`` for a batch without padding (``steps.has_padding``): the
    logits, router logits, routing and loss equal those of the all-ones mask exactly."""
    cfg = MoEConfig(num_experts=4, top_k=2, layers=[0, 2], router_init_std=0.5)
    moe = upcycle(dense_model, cfg).eval()
    ones = moe(input_ids, attention_mask=torch.ones_like(input_ids), labels=input_ids)
    none = moe(input_ids, labels=input_ids)
    assert torch.equal(ones.logits, none.logits) and torch.equal(ones.loss, none.loss)
    for i in (0, 2):
        a, b = ones.router_outputs[i], none.router_outputs[i]
        assert torch.equal(a.router_logits, b.router_logits) and torch.equal(a.topk_indices, b.topk_indices)
    padded = torch.ones_like(input_ids)
    padded[0, -3:] = 0
    assert has_padding({"attention_mask": padded}) and not has_padding(
        {"attention_mask": torch.ones_like(padded)}
    )


@pytest.mark.parametrize("balance", ["local", "global"])
def test_unpadded_micro_batch_skips_the_mask_with_the_same_values(dense_model, balance):
    """``micro_batch_loss(padded=False)`` (the trainer's call for a batch without padding) gives the objective no
    mask: every term, flag and gradient equals the masked computation's with the all-ones mask, bit for bit (T
    large and not a power of two, E=8: sums long enough for another summation order to show)."""
    cfg = MoEConfig(num_experts=8, top_k=2, layers=[0, 2], entropy_coef=0.1, router_init_std=0.5)
    moe = upcycle(dense_model, cfg).train()
    input_ids = torch.randint(0, 97, (9, 31), generator=torch.Generator().manual_seed(2))  # T = 279
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids}
    global_counts = (lambda c: c) if balance == "global" else None
    results = []
    for padded in (True, False):
        moe.zero_grad()
        torch.manual_seed(0)  # the same router noise and dropout draws
        out = moe(input_ids, labels=input_ids, output_router_logits=False)
        step = MoEStep([0, 2], 8, cfg.loss_coefs(), global_counts, False)
        sums = StepSums(2, torch.device("cpu"))
        loss = micro_batch_loss(out, batch, shifted_token_counts(batch), 2.0, step, sums, padded=padded)
        loss.backward()
        results.append((loss, sums.totals, sums.bad_L2, [p.grad.clone() for p in moe.parameters()]))
    (la, ta, fa, ga), (lb, tb, fb, gb) = results
    assert torch.equal(la, lb) and torch.equal(ta, tb) and torch.equal(fa, fb)
    assert all(torch.equal(a, b) for a, b in zip(ga, gb, strict=True))


def test_loss_coefs_are_validated_like_the_config():
    assert LossCoefs(0.0, 0.0, -0.5).entropy_coef == -0.5
    for bad in (
        dict(lb_coef=-1.0, z_coef=0.0),
        dict(lb_coef=0.0, z_coef=float("nan")),
        dict(lb_coef=True, z_coef=0.0),
    ):
        with pytest.raises(ValueError, match="LossCoefs"):
            LossCoefs(**bad)
    with pytest.raises(ValueError, match="entropy_coef"):
        LossCoefs(0.0, 0.0, float("inf"))


def test_reentrant_checkpointing_is_refused(dense_model):
    """A reentrant checkpoint runs its first forward without autograd: the router losses would lose their
    gradient silently."""
    moe = upcycle(dense_model, MoEConfig(num_experts=2))
    with pytest.raises(ValueError, match="use_reentrant=True"):
        moe.activation_checkpointing_enable({"use_reentrant": True})
    with pytest.raises(ValueError, match="use_reentrant=True"), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the old name, deprecated in newer transformers
        moe.gradient_checkpointing_enable({"use_reentrant": True})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the current API warns about nothing
        moe.activation_checkpointing_enable()
    assert moe.is_gradient_checkpointing


@pytest.mark.skipif(
    not hasattr(GPT2LMHeadModel, "activation_checkpointing_enable"), reason="older transformers"
)
def test_every_n_layers_checkpointing_gives_the_same_gradients(dense_model):
    """transformers' own entry points reach the override with their arguments (every_n_layers), and the
    router losses keep their gradients."""
    cfg = MoEConfig(num_experts=4, top_k=2, init="noise", noise_std=0.0, lb_coef=0.1, z_coef=0.01)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(3))
    grads = []
    for every in (None, 2):
        model = upcycle(dense_model, cfg).train()
        if every:
            model.activation_checkpointing_enable(every_n_layers=every)
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any("router" in n for n in grads[0])
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7)


def test_trainer_step_computes_each_term_once_per_micro_batch(tmp_path, monkeypatch):
    from moe_emergence.training.config import config_from_dict
    from moe_emergence.training.trainer import Trainer

    overrides = [f"output_dir={tmp_path}", f"data.cache_dir={tmp_path / 'cache'}", "log.run_name=once"]
    overrides += ["train.steps=4", "train.grad_accum=2", "model.upcycle_at_step=0"]
    trainer = Trainer(config_from_dict(TINY, overrides))
    try:
        trainer.upcycle_if_due()
        assert trainer.moe
        calls = _count_calls(monkeypatch)
        trainer.train_step(None)
    finally:
        trainer.folder.release()
    # 2 micro-batches x 2 MoE layers; eval and telemetry compute none of them
    assert calls == {"_load_balance_loss": 4, "_z_loss": 4, "mean": 12}  # mean: P_i, z, entropy


def test_trainer_hands_each_micro_batch_its_own_token_counts(tmp_path, monkeypatch):
    """The trainer copies the step's and each micro-batch's ``shifted_token_counts`` (from the CPU copies) to the
    device at once; each micro-batch's loss gets its own, equal to the counts of the batch it is given, and the
    step's are their sum."""
    from moe_emergence.training import steps
    from moe_emergence.training import trainer as trainer_module
    from moe_emergence.training.config import config_from_dict
    from moe_emergence.training.trainer import Trainer

    overrides = [f"output_dir={tmp_path}", f"data.cache_dir={tmp_path / 'cache'}", "log.run_name=counts"]
    overrides += ["train.steps=4", "train.grad_accum=3", "model.upcycle_at_step=0"]
    trainer = Trainer(config_from_dict(TINY, overrides))
    seen = []

    def recording(out, batch, n_step, *args, **kwargs):
        counts = args[5] if len(args) > 5 else kwargs["counts"]
        seen.append((counts.clone(), steps.shifted_token_counts(batch), n_step.clone()))
        return steps.micro_batch_loss(out, batch, n_step, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "micro_batch_loss", recording)
    try:
        trainer.upcycle_if_due()
        trainer.train_step(None)
    finally:
        trainer.folder.release()
    assert len(seen) == 3
    for given, actual, _ in seen:
        assert torch.equal(given, actual)
    total = sum(actual for _, actual, _ in seen)
    assert all(torch.equal(n_step, total.clamp_min(1)) for _, _, n_step in seen)


def test_no_split_modules_name_only_classes_the_model_has(dense_model):
    """accelerate's FSDP wraps every class named in ``_no_split_modules`` and refuses a name it cannot find."""
    from accelerate.utils.dataclasses import get_module_class_from_name

    moe = upcycle(dense_model, MoEConfig(num_experts=2, layers=[1]))
    assert set(moe._no_split_modules) == {"GPT2MoEBlock"}
    assert all(get_module_class_from_name(moe, name) is not None for name in moe._no_split_modules)


@pytest.mark.parametrize("moe", [False, True])
def test_block_equals_gpt2_block(dense_model, moe):
    """GPT2MoEBlock writes GPT-2's block out (to pass the mask to its MLP): with the same weights and a
    dense MLP (or a copy-upcycled MoE layer) it computes GPT2Block's function, cache included."""
    torch.manual_seed(0)
    ref = dense_model.transformer.h[1]
    block = GPT2MoEBlock(dense_model.config, layer_idx=1).eval()
    block.load_state_dict(ref.state_dict())
    if moe:
        block.mlp = upcycle(dense_model, MoEConfig(num_experts=2, layers=[1])).transformer.h[1].mlp.eval()
    x = torch.randn(2, 5, dense_model.config.n_embd)
    assert torch.allclose(block(x), ref(x), atol=1e-6)
    with pytest.raises(ValueError, match="cross-attention"):
        block(x, encoder_hidden_states=x)


def test_gradient_checkpointing_returns_the_same_router_outputs(dense_model, input_ids):
    cfg = MoEConfig(num_experts=4, top_k=2, noise_std=0.5, init="noise")
    outs = []
    for checkpointing in (False, True):
        model = upcycle(dense_model, cfg).train()
        if checkpointing:
            model.activation_checkpointing_enable()
        torch.manual_seed(5)
        out = model(input_ids, labels=input_ids)
        out.loss.backward()  # recomputation records each block again: the same values
        outs.append((out, {n: p.grad for n, p in model.named_parameters() if "router" in n}))
    (plain, grads), (ckpt, ckpt_grads) = outs
    for i in plain.router_outputs:
        a, b = plain.router_outputs[i], ckpt.router_outputs[i]
        assert torch.equal(a.topk_indices, b.topk_indices) and torch.allclose(a.router_probs, b.router_probs)
    assert torch.allclose(plain.aux_loss, ckpt.aux_loss) and ckpt.aux_loss.requires_grad
    for n in grads:  # the router losses' gradient reaches the routers through the checkpointed blocks
        assert torch.allclose(grads[n], ckpt_grads[n], atol=1e-6), n
