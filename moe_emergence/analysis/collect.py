"""Route an eval set through a model and keep, per token and MoE layer, what the router decided.

Shapes (legend: docs/architecture.md): B rows (eval blocks), S positions, V vocabulary, N real
(non-padding) tokens of the eval set, flattened block by block, K experts per token, E experts, Z documents.
Every per-token array of ``Routing`` has N rows in that order.
"""

from __future__ import annotations

import io
import keyword
import tokenize
from dataclasses import dataclass, field

import numpy as np
import torch

from moe_emergence.analysis.runs import EvalSet
from moe_emergence.config import MoEConfig

TOKEN_TYPES = ("keyword", "name", "number", "string", "operator", "comment", "other")
_TYPE_ID = {t: i for i, t in enumerate(TOKEN_TYPES)}
_PY_TYPES = {
    tokenize.NUMBER: "number",
    tokenize.STRING: "string",
    tokenize.OP: "operator",
    tokenize.COMMENT: "comment",
}
for _name in ("FSTRING_START", "FSTRING_MIDDLE", "FSTRING_END"):  # Python >= 3.12
    if hasattr(tokenize, _name):
        _PY_TYPES[getattr(tokenize, _name)] = "string"


@dataclass
class Routing:
    """Everything the analysis needs about one model on one eval set (numpy arrays).

    token_ids, domain, doc (document id, unique over the eval set), block, pos: ``[N]`` int64.
    token_type: ``[N]`` index into ``TOKEN_TYPES`` for code tokens, -1 for other domains.
    nll: ``[N]`` next-token loss of predicting this token from its prefix (NaN for a block's first token).
    topk, weights: ``{layer: [N, K]}`` experts (by decreasing probability) and combine weights;
    probs: ``{layer: [N, E]}`` clean router probabilities. Empty for a dense model.
    """

    domains: list[str]
    token_ids: np.ndarray
    domain: np.ndarray
    doc: np.ndarray
    block: np.ndarray
    pos: np.ndarray
    token_type: np.ndarray
    nll: np.ndarray
    num_experts: int = 0
    top_k: int = 0
    topk: dict[int, np.ndarray] = field(default_factory=dict)
    weights: dict[int, np.ndarray] = field(default_factory=dict)
    probs: dict[int, np.ndarray] = field(default_factory=dict)

    @property
    def layers(self) -> list[int]:
        return sorted(self.topk)

    @property
    def doc_domain(self) -> tuple[np.ndarray, np.ndarray]:
        """(sorted document ids ``[Z]``, domain of each ``[Z]``)."""
        docs, first = np.unique(self.doc, return_index=True)
        return docs, self.domain[first]

    def domain_of(self, docs: np.ndarray) -> np.ndarray:
        """``[len(docs)]`` the domain of each of the given document ids (bootstrap strata)."""
        all_docs, dom = self.doc_domain
        return dom[np.searchsorted(all_docs, docs)]


# ----------------------------------------------------------------------------- documents


def document_ids(eval_set: EvalSet) -> np.ndarray:
    """``[B, S]`` document id per token (-1 on padding), derived from the packing.

    The data package packs each domain's documents in order, each followed by EOS; eval blocks are not
    shuffled. So walking the selected blocks in order, a new document starts after every EOS, when the
    domain changes, at a block that does not follow the previous selected block in the corpus, and at
    padding (a packed stream's tail). The EOS token belongs to the document it ends.
    """
    ids, mask, dom = eval_set.input_ids, eval_set.attention_mask, eval_set.domain_ids
    out = np.full(ids.shape, -1, dtype=np.int64)
    doc, prev_dom, prev_row, ended = -1, None, None, True
    for b in range(ids.shape[0]):
        if prev_row is None or eval_set.rows[b] != prev_row + 1:
            ended = True
        prev_row = eval_set.rows[b]
        for t in range(ids.shape[1]):
            if not mask[b, t]:
                ended = True
                continue
            if ended or dom[b, t] != prev_dom:
                doc += 1
                ended = False
            out[b, t] = doc
            prev_dom = dom[b, t]
            if ids[b, t] == eval_set.eos_token_id:
                ended = True
    return out


# ----------------------------------------------------------------------------- Python token types


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: every byte maps to a printable character."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


_BYTE_DECODER = {c: b for b, c in _bytes_to_unicode().items()}


def token_bytes(tokenizer, ids: list[int]) -> list[bytes]:
    """The bytes each token contributes to the text (special tokens give b"").

    Byte-level BPE tokens (GPT-2's and the data package's) map back exactly through the byte alphabet;
    any other token falls back to ``tokenizer.decode([id])``.
    """
    special = set(tokenizer.all_special_ids)
    out = []
    for i, tok in zip(ids, tokenizer.convert_ids_to_tokens(ids), strict=True):
        if i in special:
            out.append(b"")
        elif all(ch in _BYTE_DECODER for ch in tok):
            out.append(bytes(_BYTE_DECODER[ch] for ch in tok))
        else:
            out.append(tokenizer.decode([i]).encode("utf-8"))
    return out


def _char_types(text: str) -> np.ndarray:
    """``[len(text)]`` type id of every character from Python's ``tokenize`` (``other`` outside tokens).

    Code documents may be fragments; on an indentation error tokenizing restarts on the next line, on
    another error (e.g. an unterminated string at the end) the rest of the text stays ``other``.
    """
    lines = text.splitlines(keepends=True)
    starts = np.concatenate([[0], np.cumsum([len(x) for x in lines])]).astype(np.int64)
    out = np.full(len(text), _TYPE_ID["other"], dtype=np.int64)
    first = 0
    while first < len(lines):
        chunk = "".join(lines[first:])
        try:
            for tok in tokenize.generate_tokens(io.StringIO(chunk).readline):
                if tok.type == tokenize.NAME:
                    kind = "keyword" if keyword.iskeyword(tok.string) else "name"
                else:
                    kind = _PY_TYPES.get(tok.type)
                if kind is None:
                    continue
                (r0, c0), (r1, c1) = tok.start, tok.end
                a = starts[min(first + r0 - 1, len(lines))] + c0
                b = starts[min(first + r1 - 1, len(lines))] + c1
                out[a:b] = _TYPE_ID[kind]
            break
        except IndentationError as e:
            first += max(int(e.lineno or 1) - 1, 1)  # restart at the offending line (progress guaranteed)
        except (tokenize.TokenError, SyntaxError):
            break
    return out


def code_token_types(tokenizer, ids: list[int]) -> np.ndarray:
    """``[len(ids)]`` Python token type (index into ``TOKEN_TYPES``) of each BPE token of one code document.

    The document is decoded to bytes token by token (character offsets by accumulation), ``tokenize``
    labels every character, and a BPE token takes the type of its first non-whitespace character
    (a whitespace-only token the type of its first character: ``other`` between Python tokens, ``string``
    or ``comment`` inside one; special tokens are ``other``).
    """
    pieces = token_bytes(tokenizer, ids)
    data = b"".join(pieces)
    text = data.decode("utf-8", errors="surrogateescape")  # one character per undecodable byte
    char_type = _char_types(text)
    byte_type = np.repeat(char_type, [len(ch.encode("utf-8", errors="surrogateescape")) for ch in text])
    out = np.full(len(ids), _TYPE_ID["other"], dtype=np.int64)
    offset = 0
    for i, piece in enumerate(pieces):
        if piece:
            stripped = len(piece) - len(piece.lstrip())
            out[i] = byte_type[offset + (stripped if stripped < len(piece) else 0)]
        offset += len(piece)
    return out


# ----------------------------------------------------------------------------- forward passes


def iter_batches(eval_set: EvalSet, batch_size: int, desc: str | None = None, progress: bool = True):
    """Yield (block slice, input_ids [b, S], attention_mask [b, S]) LongTensors, with a tqdm bar when
    ``progress`` (tqdm is not even imported without: in a notebook its import warns without ipywidgets)."""
    B = eval_set.input_ids.shape[0]
    starts = range(0, B, batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=desc, leave=False, unit="batch")
    for s in starts:
        sl = slice(s, min(s + batch_size, B))
        yield sl, torch.from_numpy(eval_set.input_ids[sl]), torch.from_numpy(eval_set.attention_mask[sl])


def token_nll(logits_BSV: torch.Tensor, ids_BS: torch.Tensor) -> torch.Tensor:
    """``[B, S]`` -log p(x_t | x_<t) in float32; position 0 is NaN (nothing predicts it)."""
    logp = torch.log_softmax(logits_BSV[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, ids_BS[:, 1:, None]).squeeze(-1)
    return torch.cat([torch.full_like(nll[:, :1], float("nan")), nll], dim=1)


@torch.no_grad()
def eval_nll(
    model,
    eval_set: EvalSet,
    batch_size: int = 8,
    desc: str | None = None,
    progress: bool = True,
    expert_masks: dict[int, torch.Tensor] | None = None,
) -> np.ndarray:
    """``[B, S]`` per-token next-token loss of ``model`` on the eval set (NaN at position 0 and padding).
    ``expert_masks`` (MoE models): ``{block: bool [E]}`` experts removed from routing (ablation)."""
    device = next(model.parameters()).device
    model.eval()
    kw = {"use_cache": False}  # scoring only: no KV cache built
    if isinstance(getattr(model.config, "moe", None), MoEConfig):
        kw |= {"output_router_logits": False, "expert_masks": expert_masks}
    elif expert_masks is not None:
        raise ValueError("eval_nll: expert_masks given for a model without MoE layers")
    out = np.full(eval_set.input_ids.shape, np.nan)
    for sl, ids, mask in iter_batches(eval_set, batch_size, desc, progress):
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), **kw).logits
        nll = token_nll(logits, ids.to(device)).cpu().numpy()
        out[sl] = np.where(mask.numpy() > 0, nll, np.nan)
    return out


@torch.no_grad()
def collect_routing(
    model, eval_set: EvalSet, tokenizer, batch_size: int = 8, progress: bool = True, desc: str = "routing"
) -> Routing:
    """Run the eval set through ``model`` (eval mode, no grad) and collect the per-token routing.

    Works for a dense model too (no routing, only losses). Code tokens get their Python token type.
    """
    device = next(model.parameters()).device
    model.eval()
    is_moe = isinstance(getattr(model.config, "moe", None), MoEConfig)
    mask_BS = eval_set.attention_mask > 0
    nll_BS = np.full(mask_BS.shape, np.nan)
    topk, weights, probs = {}, {}, {}
    for sl, ids, mask in iter_batches(eval_set, batch_size, desc, progress):
        kw = {"output_router_logits": False} if is_moe else {}  # the routing, not the router losses
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False, **kw)
        nll_BS[sl] = token_nll(out.logits, ids.to(device)).cpu().numpy()
        if is_moe:
            keep = mask.reshape(-1).numpy() > 0
            for layer, r in out.router_outputs.items():
                topk.setdefault(layer, []).append(r.topk_indices.cpu().numpy()[keep])
                weights.setdefault(layer, []).append(r.topk_weights.float().cpu().numpy()[keep])
                probs.setdefault(layer, []).append(r.router_probs_clean.float().cpu().numpy()[keep])
    doc_BS = document_ids(eval_set)
    block_BS = np.broadcast_to(np.arange(mask_BS.shape[0])[:, None], mask_BS.shape)
    pos_BS = np.broadcast_to(np.arange(mask_BS.shape[1])[None, :], mask_BS.shape)
    token_ids = eval_set.input_ids[mask_BS]
    domain = eval_set.domain_ids[mask_BS]
    doc = doc_BS[mask_BS]
    token_type = np.full(len(token_ids), -1, dtype=np.int64)
    if "code" in eval_set.domains:
        idx = np.flatnonzero(domain == eval_set.domains.index("code"))
        idx = idx[np.argsort(doc[idx], kind="stable")]  # code tokens grouped by document, in order
        cuts = np.flatnonzero(np.diff(doc[idx])) + 1
        for sel in np.split(idx, cuts) if len(idx) else []:
            token_type[sel] = code_token_types(tokenizer, token_ids[sel].tolist())
    routing = Routing(
        domains=list(eval_set.domains),
        token_ids=token_ids,
        domain=domain,
        doc=doc,
        block=block_BS[mask_BS],
        pos=pos_BS[mask_BS],
        token_type=token_type,
        nll=nll_BS[mask_BS],
    )
    if is_moe:
        moe = model.config.moe
        routing.num_experts, routing.top_k = moe.num_experts, moe.top_k
        routing.topk = {k: np.concatenate(v) for k, v in topk.items()}
        routing.weights = {k: np.concatenate(v) for k, v in weights.items()}
        routing.probs = {k: np.concatenate(v) for k, v in probs.items()}
    return routing
