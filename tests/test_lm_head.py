"""The LM head's aligned GEMMs (moe_emergence/lm_head.py): same logits and gradients as nn.Linear, the padding
only where it is meant to run, and the weight tying and checkpoints of GPT-2 kept."""

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_gpt2_config
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import GPT2LMHeadModel

from moe_emergence import GPT2MoEConfig, GPT2MoEForCausalLM
from moe_emergence.lm_head import AlignedLMHead, align_lm_head, padded_linear

CUDA = torch.cuda.is_available()


class OpNames(TorchDispatchMode):
    """Records the aten ops run under it."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.__name__)
        return func(*args, **(kwargs or {}))


def _grads(fn, x, w, b):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    b = None if b is None else b.clone().requires_grad_()
    y = fn(x, w, b)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()  # a gradient unlike any padding's
    return y, [x.grad, w.grad] + ([] if b is None else [b.grad])


@pytest.mark.parametrize("V, pad_to", [(50, 64), (101, 64), (130, 7), (64, 64), (1, 8)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("lead", [(5,), (2, 3)])
def test_padded_linear_is_linear_values_and_gradients(V, pad_to, bias, lead):
    gen = torch.Generator().manual_seed(V + pad_to)
    D = 24
    x = torch.randn(*lead, D, generator=gen, dtype=torch.float64)
    w = torch.randn(V, D, generator=gen, dtype=torch.float64)
    b = torch.randn(V, generator=gen, dtype=torch.float64) if bias else None
    y, grads = _grads(lambda x, w, b: padded_linear(x, w, b, pad_to), x, w, b)
    y_ref, grads_ref = _grads(F.linear, x, w, b)
    assert y.shape == (*lead, V) and y.is_contiguous()
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert g.shape == g_ref.shape
        torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)


def test_padded_linear_under_autocast_casts_then_pads():
    gen = torch.Generator().manual_seed(0)
    x, w, b = (
        torch.randn(6, 32, generator=gen),
        torch.randn(101, 32, generator=gen),
        torch.randn(101, generator=gen),
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_ref = padded_linear(x, w, b, 64), F.linear(x, w, b)
        with OpNames() as ops:
            padded_linear(x, w, b, 64)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_ref)
    # the weight is cast to bf16 (a copy) before its padded copy: the pad reads 2-byte elements
    assert ops.names.index("_to_copy.default") < ops.names.index("constant_pad_nd.default")


def test_padded_linear_leaves_float64_alone_under_autocast_and_checks_pad_to():
    x, w = torch.randn(3, 8, dtype=torch.float64), torch.randn(101, 8, dtype=torch.float64)
    # autocast never casts float64; neither does the padding
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = padded_linear(x, w, None, 64)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, F.linear(x, w), rtol=1e-12, atol=1e-12)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match=f"pad_to must be a positive int, got {bad!r}"):
            padded_linear(x, w, None, bad)


def test_the_head_pads_only_on_its_devices():
    x = torch.randn(3, 16)
    # pads on CUDA only: on the CPU nn.Linear's forward (the padding measured slower)
    head = AlignedLMHead(16, 101)
    with OpNames() as ops:
        y = head(x)
    assert not head.pads() and "constant_pad_nd.default" not in ops.names
    torch.testing.assert_close(y, F.linear(x, head.weight, head.bias))
    head.pad_on = ("cpu",)
    with OpNames() as ops:
        y = head(x)
    assert head.pads() and ops.names.count("constant_pad_nd.default") == 2  # weight and bias
    torch.testing.assert_close(y, F.linear(x, head.weight, head.bias))
    assert not AlignedLMHead(16, 128, pad_on=("cpu",)).pads()  # V a multiple of pad_to: nothing to pad


def test_the_head_does_not_pad_under_compile():
    head = AlignedLMHead(16, 101, pad_on=("cpu",))
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    x = torch.randn(3, 16)
    y = torch.compile(head, backend=backend, fullgraph=True)(x)
    targets = {getattr(n.target, "__name__", str(n.target)) for g in graphs for n in g.graph.nodes}
    assert graphs and "linear" in targets and "pad" not in targets, targets
    torch.testing.assert_close(y, F.linear(x, head.weight, head.bias))


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_the_head_pads_on_cuda_values_and_gradients_as_linear():
    head = AlignedLMHead(64, 50257, bias=False).cuda()
    ref = nn.Linear(64, 50257, bias=False).cuda()
    ref.weight = head.weight
    x = torch.randn(2, 7, 64, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        with OpNames() as ops:
            y = head(x)
        y_ref = ref(x)
    assert "constant_pad_nd.default" in ops.names and y.is_contiguous()
    torch.testing.assert_close(y, y_ref)
    g = torch.autograd.grad(y.float().square().sum(), head.weight)[0]
    g_ref = torch.autograd.grad(y_ref.float().square().sum(), head.weight)[0]
    torch.testing.assert_close(g, g_ref, rtol=2e-2, atol=2e-2)


def test_align_lm_head_keeps_the_tie_and_the_checkpoint(tmp_path):
    model = GPT2LMHeadModel(tiny_gpt2_config()).eval()
    keys, ids = set(model.state_dict()), torch.randint(0, 97, (2, 9))
    logits = model(input_ids=ids).logits
    align_lm_head(model)
    head = model.lm_head
    assert isinstance(head, AlignedLMHead) and head.pad_to == 64
    assert head.weight is model.transformer.wte.weight  # still tied: one parameter
    assert set(model.state_dict()) == keys
    torch.testing.assert_close(model(input_ids=ids).logits, logits)
    align_lm_head(model)
    assert model.lm_head is head  # already aligned: a no-op
    model.save_pretrained(tmp_path)
    loaded = GPT2LMHeadModel.from_pretrained(tmp_path)  # a plain GPT-2 checkpoint, loaded by transformers
    torch.testing.assert_close(loaded(input_ids=ids).logits, logits)


def test_align_lm_head_keeps_bias_mode_and_initialisation(monkeypatch):
    model = GPT2LMHeadModel(tiny_gpt2_config())
    head = nn.Linear(24, 97)
    head._is_hf_initialized = True
    model.lm_head = head
    model.eval()
    align_lm_head(model)
    assert (
        model.lm_head.bias is head.bias and model.lm_head.weight is head.weight and not model.lm_head.training
    )
    assert model.lm_head._is_hf_initialized
    # the MoE model swaps its head in before its second post_init: that must draw no new weights
    import moe_emergence.modeling as modeling

    cfg = GPT2MoEConfig(**tiny_gpt2_config().to_dict(), moe=dict(num_experts=4, top_k=1, layers=[1]))
    built = []
    for align in (modeling.align_lm_head, lambda model: None):
        monkeypatch.setattr(modeling, "align_lm_head", align)
        torch.manual_seed(0)
        built.append((GPT2MoEForCausalLM(cfg).state_dict(), torch.get_rng_state()))
    (aligned, rng_aligned), (plain, rng_plain) = built
    assert aligned.keys() == plain.keys() and torch.equal(rng_aligned, rng_plain)
    for k in aligned:
        assert torch.equal(aligned[k], plain[k]), k


def test_align_lm_head_refuses_other_heads_and_pad_to():
    model = GPT2LMHeadModel(tiny_gpt2_config())
    model.lm_head = nn.Sequential(nn.Linear(24, 97))
    with pytest.raises(TypeError, match="Sequential, not an nn.Linear"):
        align_lm_head(model)
    with pytest.raises(ValueError, match="pad_to must be a positive int, got 0"):
        AlignedLMHead(16, 101, pad_to=0)


def test_the_moe_model_has_the_aligned_head_tied_after_loading(tmp_path):
    cfg = GPT2MoEConfig(**tiny_gpt2_config().to_dict(), moe=dict(num_experts=4, top_k=1, layers=[1]))
    model = GPT2MoEForCausalLM(cfg)
    assert isinstance(model.lm_head, AlignedLMHead) and model.lm_head.weight is model.transformer.wte.weight
    model.save_pretrained(tmp_path)
    loaded = GPT2MoEForCausalLM.from_pretrained(tmp_path)
    assert (
        isinstance(loaded.lm_head, AlignedLMHead) and loaded.lm_head.weight is loaded.transformer.wte.weight
    )
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_generate_on_cuda_with_the_padded_head_matches_nn_linear():
    cfg = GPT2MoEConfig(**tiny_gpt2_config().to_dict(), moe=dict(num_experts=4, top_k=2, layers=[1]))
    torch.manual_seed(0)
    model = GPT2MoEForCausalLM(cfg).cuda().eval()
    prompt = torch.randint(1, 97, (3, 5), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(prompt))
    assert model.lm_head.pads()
    with torch.no_grad():
        logits = model(input_ids=prompt).logits
        tokens = model.generate(prompt, **kw)
        plain = nn.Linear(24, 97, bias=False, device="cuda")
        plain.weight = model.lm_head.weight
        model.lm_head = plain
        torch.testing.assert_close(model(input_ids=prompt).logits, logits)
        assert torch.equal(model.generate(prompt, **kw), tokens)
