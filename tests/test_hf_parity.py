"""Hugging Face parity at the edges (issue 18): left-padded generation through HF's generation utilities,
``return_dict``, the standard MoE outputs, no KV cache in training, no deprecation chatter, the saved
folder's model card, and token masks of the shapes users pass to the model."""

from __future__ import annotations

import inspect
import logging
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import tiny_gpt2_config
from transformers import GPT2LMHeadModel
from transformers.cache_utils import Cache

from moe_emergence import GPT2MoEForCausalLM, MoEConfig, upcycle
from moe_emergence.losses import masked_mean, tokens_per_expert
from moe_emergence.telemetry.stats import DomainLossStats, RoutingStats, variant_metrics

PROMPTS = [[11, 22, 33, 44], [5, 6], [7, 8, 9, 10, 12, 13]]
GEN = dict(max_new_tokens=6, pad_token_id=0, eos_token_id=None)


def _left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    P = max(map(len, prompts))
    ids = torch.tensor([[0] * (P - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


@pytest.fixture(scope="module")
def parent() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny_gpt2_config(n_positions=64)).eval()
    with torch.no_grad():
        for block in model.transformer.h:
            block.mlp.c_fc.bias.normal_(std=0.1)
            block.mlp.c_proj.bias.normal_(std=0.1)
    return model


def _generate(model, prompts, mode: str, use_cache: bool, seed: int = 0):
    ids, mask = _left_padded(prompts)
    kw = dict(GEN, use_cache=use_cache, output_logits=True, return_dict_in_generate=True)
    if mode == "greedy":
        kw.update(do_sample=False)
    elif mode == "sample":
        kw.update(do_sample=True, top_k=20, temperature=1.3)
    else:
        kw.update(do_sample=False, num_beams=3)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, **kw)
    return out.sequences[:, ids.shape[1] :], torch.stack(out.logits, dim=1)


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no_cache"])
@pytest.mark.parametrize("mode", ["greedy", "sample", "beam"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_copy_init_generates_what_the_dense_parent_generates(parent, top_k, mode, use_cache):
    """A copy-init MoE computes its parent's function, so HF's generation utilities (greedy, seeded
    sampling, beam search; KV cache on and off) give the parent's tokens and logits, for a left-padded
    batch and for each prompt alone; and each batch row is what that prompt generates alone."""
    moe = upcycle(parent, MoEConfig(num_experts=4, top_k=top_k, init="copy")).eval()
    seq_moe, logits_moe = _generate(moe, PROMPTS, mode, use_cache)
    seq_dense, logits_dense = _generate(parent, PROMPTS, mode, use_cache)
    assert torch.equal(seq_moe, seq_dense)
    torch.testing.assert_close(logits_moe, logits_dense, atol=1e-5, rtol=1e-5)
    if mode == "sample":  # the random stream depends on the batch: rows alone are compared with the parent
        for p in PROMPTS:
            assert torch.equal(
                _generate(moe, [p], mode, use_cache)[0], _generate(parent, [p], mode, use_cache)[0]
            )
        return
    for b, p in enumerate(PROMPTS):
        seq_alone, logits_alone = _generate(parent, [p], mode, use_cache)
        assert torch.equal(seq_moe[b : b + 1], seq_alone), f"prompt {b}"
        if mode == "greedy":
            torch.testing.assert_close(logits_moe[b : b + 1], logits_alone, atol=1e-5, rtol=1e-5)


def _variant(parent, **moe) -> GPT2MoEForCausalLM:
    torch.manual_seed(1)
    model = upcycle(
        parent, MoEConfig(num_experts=4, init="noise", init_noise_std=0.3, router_init_std=0.5, **moe)
    )
    if moe.get("bias_update_rate"):
        for layer in model.moe_layers().values():
            layer.router.selection_bias.copy_(torch.tensor([0.3, -0.2, 0.1, 0.0]))
    return model.eval()


VARIANTS = {
    "top1": dict(top_k=1),
    "top2": dict(top_k=2),
    "top2_unnormalised": dict(top_k=2, normalize_topk=False),
    "selection_bias": dict(top_k=1, bias_update_rate=0.01),
    "shared_learned_gate": dict(top_k=1, shared_expert=True, shared_expert_gate="learned"),
    "train_only_variants": dict(top_k=2, random_routing_prob=0.5, expert_dropout=0.3, noise_std=1.0),
}


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no_cache"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_left_padded_batch_generates_what_each_prompt_generates_alone(parent, variant, use_cache):
    """Every token-wise routing variant (experts that differ, so routing matters): a left-padded batch
    gives each prompt's own greedy and beam-search continuation and logits."""
    moe = _variant(parent, **VARIANTS[variant])
    for mode in ("greedy", "beam"):
        seq, logits = _generate(moe, PROMPTS, mode, use_cache)
        for b, p in enumerate(PROMPTS):
            seq_alone, logits_alone = _generate(moe, [p], mode, use_cache)
            assert torch.equal(seq[b : b + 1], seq_alone), f"{mode} prompt {b}"
            if mode == "greedy":
                torch.testing.assert_close(logits[b : b + 1], logits_alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no_cache"])
@pytest.mark.parametrize("overflow", ["drop", "next_best"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_capacity_routing_generates_the_same_with_left_padding(parent, top_k, overflow, use_cache):
    """Capacity counts real tokens only, so a left-padded prompt routes (and drops) exactly as alone.
    (Capacity couples the tokens of one forward: different prompts in one batch share it, as in Switch.)"""
    moe = _variant(parent, top_k=top_k, capacity_factor=1.0, overflow=overflow)
    prompt = PROMPTS[0]
    with torch.no_grad():
        dropped = moe(torch.tensor([prompt + PROMPTS[2]])).router_outputs[0].dropped
    assert overflow == "next_best" or dropped.any()  # the capacity binds (not a vacuous comparison)
    for mode in ("greedy", "beam"):
        ids, mask = torch.tensor([[0, 0, 0] + prompt]), torch.tensor([[0, 0, 0] + [1] * len(prompt)])
        kw = dict(GEN, use_cache=use_cache, output_logits=True, return_dict_in_generate=True)
        kw.update(do_sample=False, num_beams=3 if mode == "beam" else 1)
        with torch.no_grad():
            padded = moe.generate(ids, attention_mask=mask, **kw)
        seq_alone, logits_alone = _generate(moe, [prompt], mode, use_cache)
        assert torch.equal(padded.sequences[:, ids.shape[1] :], seq_alone), mode
        torch.testing.assert_close(torch.stack(padded.logits, 1), logits_alone, atol=1e-5, rtol=1e-5)


def test_forward_signature_is_gpt2s_plus_the_moe_arguments():
    ours = list(inspect.signature(GPT2MoEForCausalLM.forward).parameters)
    theirs = [n for n in inspect.signature(GPT2LMHeadModel.forward).parameters if n != "kwargs"]
    theirs = ["cache" if n == "past_key_values" else n for n in theirs]  # the older 5.x name
    assert ours[: len(theirs)] == theirs
    assert ours[len(theirs) :] == ["output_router_logits", "loss_coefs", "expert_masks", "kwargs"]


def test_return_dict_false_gives_hf_tuple(parent):
    moe = upcycle(parent, MoEConfig(num_experts=4, top_k=2, init="noise")).eval()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    full = moe(ids, labels=ids)
    loss, logits, *_ = moe(ids, labels=ids, return_dict=False)
    assert torch.equal(loss, full.loss) and torch.equal(logits, full.logits)
    assert isinstance(moe(ids, return_dict=False), tuple)
    # the tuple follows the output's fields: GPT-2's (loss, logits, ...), then lm_loss, the router terms
    out = moe(ids, labels=ids, output_router_logits=True)
    assert list(out.keys()) == [f for f in type(out).__dataclass_fields__ if out.get(f) is not None]
    assert list(out.keys())[:3] == ["loss", "logits", "lm_loss"]
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        moe()
    # (config.return_dict=False fails inside GPT2Model itself in transformers 5: not part of the parity)


def test_output_router_logits_gives_per_layer_router_logits_beside_the_loss_terms(parent):
    moe = upcycle(parent, MoEConfig(num_experts=4, top_k=2, init="noise", layers=[0, 2])).eval()
    ids = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]])
    out = moe(ids, labels=ids, output_router_logits=True)
    assert len(out.router_logits) == 2 and all(t.shape == (10, 4) for t in out.router_logits)
    assert torch.equal(out.router_logits[1], out.router_outputs[2].router_logits)
    assert out.aux_loss is not None and out.z_loss is not None
    off = moe(ids, labels=ids, output_router_logits=False)
    assert off.router_logits is None and off.aux_loss is None and torch.equal(off.loss, off.lm_loss)


def _caches(out) -> list:
    return [v for v in out.to_tuple() if isinstance(v, Cache)]


def test_training_forward_builds_no_kv_cache(parent):
    moe = upcycle(parent, MoEConfig(num_experts=4, top_k=1, init="noise"))
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    assert _caches(moe.train()(ids, labels=ids)) == []
    assert _caches(moe.eval()(ids, labels=ids)) == []  # an eval loss needs no cache either
    assert len(_caches(moe.eval()(ids))) == 1  # inference: HF's default (config.use_cache)
    assert len(_caches(moe.train()(ids, use_cache=True))) == 1  # asked for


def test_compiled_training_forward_guards_on_no_kv_cache(parent):
    """A KV cache built on every training forward made dynamo guard on (and recompile for) the cache's
    state (``cache.layers[i].is_initialized``) until the recompile limit."""
    moe = upcycle(parent, MoEConfig(num_experts=4, top_k=1, init="noise")).train()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    torch._dynamo.reset()
    handler = _Records()
    logging.getLogger("torch._dynamo").addHandler(handler)
    torch._logging.set_logs(recompiles=True)
    try:
        step = torch.compile(moe, backend="eager")
        for _ in range(4):
            step(ids, labels=ids).loss.backward()
    finally:
        torch._logging.set_logs()
        logging.getLogger("torch._dynamo").removeHandler(handler)
        torch._dynamo.reset()
    reasons = [m for m in handler.messages if "Recompiling" in m]
    assert not [m for m in reasons if "is_initialized" in m or "cache" in m.lower()], reasons


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_no_deprecation_or_tied_weight_chatter(parent, tmp_path):
    """Forward (train and eval), generate with and without cache, save and load print nothing deprecated
    and no ``Removed shared tensor`` line (transformers' and accelerate's loggers, Python warnings)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.get_logger("x").warning_once.cache_clear()  # warning_once: forget what was said before
    handler = _Records()
    loggers = [logging.getLogger("transformers"), logging.getLogger("accelerate")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            moe = upcycle(parent, MoEConfig(num_experts=4, top_k=2, init="noise"))
            ids, mask = _left_padded(PROMPTS)
            moe.train()(ids, attention_mask=mask, labels=ids).loss.backward()
            moe.eval()
            with torch.no_grad():
                for use_cache in (True, False):
                    moe.generate(ids, attention_mask=mask, use_cache=use_cache, **GEN)
                out = moe(ids, attention_mask=mask)
                moe(ids[:, -1:], cache=_caches(out)[0], attention_mask=torch.cat([mask, mask[:, -1:]], 1))
            moe.save_pretrained(tmp_path / "m")
            AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
    said = handler.messages + [str(w.message) for w in caught]
    assert not [m for m in said if "deprecat" in m.lower() or "Removed shared tensor" in m], said


def test_saved_folder_says_how_to_load_it(parent, tmp_path):
    moe = upcycle(parent, MoEConfig(num_experts=4, top_k=1, init="copy", layers=[1]))
    moe.save_pretrained(tmp_path / "m")
    card = (tmp_path / "m" / "README.md").read_text()
    assert "import moe_emergence" in card and "gpt2_moe" in card and "trust_remote_code" in card
    assert card.startswith("---\nlibrary_name: moe-emergence")
    code = (
        "from transformers import AutoModelForCausalLM\n"
        f"AutoModelForCausalLM.from_pretrained({str(tmp_path / 'm')!r})\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode != 0 and "gpt2_moe" in res.stderr  # what the card explains
    bigger = upcycle(parent, MoEConfig(num_experts=8, top_k=2, init="copy", layers=[0, 1]))
    bigger.save_pretrained(tmp_path / "m")  # the package's own card follows the model saved last
    assert "blocks [0, 1] are\nmixtures of 8 experts (top-2" in (tmp_path / "m" / "README.md").read_text()
    edited = (tmp_path / "m" / "README.md").read_text() + "\nMy notes.\n"
    (tmp_path / "m" / "README.md").write_text(edited)
    moe.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "README.md").read_text() == edited  # an edited card is the user's
    (tmp_path / "u").mkdir()
    (tmp_path / "u" / "README.md").write_text("my own card")
    moe.save_pretrained(tmp_path / "u")
    assert (tmp_path / "u" / "README.md").read_text() == "my own card"  # never overwritten


def test_token_masks_of_the_shapes_users_pass(parent):
    """[T] and the model's [B, S] attention mask are the same mask to every function that takes one (any
    non-zero entry is real); the forward and the router, which know B, also take the [B, H + S] mask of a
    cached forward; other shapes (a wider mask without B) are refused with the accepted ones named."""
    moe = upcycle(parent, MoEConfig(num_experts=4, top_k=2, init="noise", capacity_factor=1.0)).eval()
    ids, mask_BS = _left_padded(PROMPTS)
    out = moe(ids, attention_mask=mask_BS)
    r = out.router_outputs[0]
    flat = mask_BS.reshape(-1)
    for m in (mask_BS, mask_BS * 2, mask_BS.bool()):
        assert torch.equal(
            tokens_per_expert(r.topk_indices, 4, m), tokens_per_expert(r.topk_indices, 4, flat)
        )
        assert torch.equal(masked_mean(r.entropy, m), masked_mean(r.entropy, flat))
        a, b = variant_metrics(out.router_outputs, m), variant_metrics(out.router_outputs, flat, {})
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        s1, s2 = RoutingStats(4, 1, "cpu"), RoutingStats(4, 1, "cpu")
        s1.add(r, m)
        s2.add(r, flat)
        assert torch.equal(s1.buf, s2.buf)
    cached = torch.cat([torch.ones(3, 2, dtype=mask_BS.dtype), mask_BS], dim=1)  # 2 past positions
    router = moe.moe_layers()[0].router
    x_BSD = torch.randn(3, 6, router.d_model)
    a, b, c = router(x_BSD, mask_BS), router(x_BSD, flat), router(x_BSD, cached)
    for got in (a, c):
        assert torch.equal(got.topk_weights, b.topk_weights) and torch.equal(got.dropped, b.dropped)
    loss_BS, domain_BS = torch.rand(3, 6), torch.tensor([0, 1] * 9).reshape(3, 6)
    d1, d2 = DomainLossStats(2, "cpu"), DomainLossStats(2, "cpu")
    d1.add(loss_BS, domain_BS, cached)  # [B, S] domains give B
    d2.add(loss_BS, domain_BS, flat)
    assert torch.equal(d1.buf, d2.buf)
    with pytest.raises(ValueError, match=r"token mask has shape \(3, 8\)"):
        masked_mean(r.entropy, cached)  # no B here: a wider mask is ambiguous
    with pytest.raises(ValueError, match=r"token mask has shape \(5,\).*\(18,\)"):
        tokens_per_expert(r.topk_indices, 4, torch.ones(5))
