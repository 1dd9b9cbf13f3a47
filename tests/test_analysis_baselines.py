"""Issue 21's analysis statistics against closed forms: MI normalisations (and scikit-learn where installed),
I(domain; expert | token id), the null baselines (document permutations, the cross-fitted token-identity
router), the change from the step-0 router, and the exact sign-flip test over seeds."""

import itertools
import math

import numpy as np
import pytest

from moe_emergence.analysis import baselines as b
from moe_emergence.analysis import domain_summary as ds
from moe_emergence.analysis import metrics as m
from moe_emergence.analysis.collect import Routing
from moe_emergence.analysis.seeds import paired_test, sign_flip_test

LN2 = math.log(2)

# ----------------------------------------------------------------------------- MI and its normalisations


def test_independent_table_gives_zero_for_every_normalisation():
    info = m.information_measures(np.outer([1, 2, 3], [2, 4, 1, 5]))
    assert info == pytest.approx({"mi_nats": 0, "nmi": 0, "nmi_sqrt": 0, "nmi_arith": 0}, abs=1e-12)


def test_permutation_diagonal_table_gives_one_for_every_normalisation():
    counts = np.zeros((3, 3))
    counts[0, 2], counts[1, 0], counts[2, 1] = 5, 7, 3  # domain d -> its own expert, and back
    info = m.information_measures(counts)
    assert info["mi_nats"] == pytest.approx(m.entropy([5, 7, 3]))
    assert (info["nmi"], info["nmi_sqrt"], info["nmi_arith"]) == pytest.approx((1, 1, 1))


def test_hand_computed_tables():
    # symmetric 2x2: H(D) = H(E) = ln 2, I = (2/3) ln(4/3) + (1/3) ln(2/3); all normalisations equal I / ln 2
    i = (2 / 3) * math.log(4 / 3) + (1 / 3) * math.log(2 / 3)
    info = m.information_measures([[2, 1], [1, 2]])
    assert info == pytest.approx({"mi_nats": i, "nmi": i / LN2, "nmi_sqrt": i / LN2, "nmi_arith": i / LN2})
    # the expert determines the domain but splits one domain over 2 experts: I = H(D) = ln 2,
    # H(E) = 1.5 ln 2, so nmi = 1, nmi_sqrt = 1 / sqrt(1.5), nmi_arith = 1 / 1.25
    info = m.information_measures([[2, 2, 0], [0, 0, 4]])
    assert info == pytest.approx(
        {"mi_nats": LN2, "nmi": 1.0, "nmi_sqrt": 1 / math.sqrt(1.5), "nmi_arith": 0.8}
    )
    assert m.symmetric_nmi([[2, 2, 0], [0, 0, 4]]) == pytest.approx(0.8)
    assert m.information_measures([[5, 3]])["nmi"] == 0.0  # one domain: H(D) = 0


def test_normalisations_agree_with_scikit_learn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    d = rng.integers(0, 3, 4000)
    e = np.where(rng.random(4000) < 0.4, d * 2, rng.integers(0, 8, 4000))
    info = m.information_measures(m.joint_counts(d, e, 3, 8))
    assert info["mi_nats"] == pytest.approx(metrics.mutual_info_score(d, e))
    assert info["nmi_arith"] == pytest.approx(metrics.normalized_mutual_info_score(d, e))
    sqrt = metrics.normalized_mutual_info_score(d, e, average_method="geometric")
    assert info["nmi_sqrt"] == pytest.approx(sqrt)


# ----------------------------------------------------------------------------- I(D; E | X)


def test_cmi_is_zero_when_the_expert_is_a_function_of_the_token():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 21, 3000)
    d = (x // 7 + (rng.random(3000) < 0.2)) % 3  # the token says a lot about the domain
    e = x // 3  # ... and fixes the expert: domain and expert share information, none beyond the token
    counts = np.zeros((21, 3, 8))
    np.add.at(counts, (x, d, e), 1)
    assert m.mutual_information(counts.sum(0)) > 0.4
    assert m.conditional_mutual_information(counts) == pytest.approx(0.0, abs=1e-12)


def test_cmi_closed_forms():
    # token 0 (6 tokens): expert = domain, I = ln 2; token 1 (4 tokens): independent, I = 0
    counts = np.zeros((2, 2, 2))
    counts[0] = [[3, 0], [0, 3]]
    counts[1] = [[1, 1], [1, 1]]
    assert m.conditional_mutual_information(counts) == pytest.approx(0.6 * LN2)
    # in general: sum_x p(x) I(D; E | X = x), each slice's MI from the MI owner
    rng = np.random.default_rng(2)
    counts = rng.integers(0, 6, (7, 3, 4)).astype(float)
    expected = sum(c.sum() * m.mutual_information(c) for c in counts) / counts.sum()
    assert m.conditional_mutual_information(counts) == pytest.approx(expected)
    assert m.conditional_mutual_information(np.zeros((2, 2, 2))) == 0.0


# ----------------------------------------------------------------------------- baselines


def test_document_folds_alternate_within_each_domain():
    np.testing.assert_array_equal(b.document_folds([0, 0, 1, 0, 1, 2]), [0, 1, 0, 0, 1, 0])


def test_token_identity_router_is_cross_fitted():
    ids = np.array([5, 5, 5, 7, 5, 5, 9, 7])
    experts = np.array([1, 1, 2, 0, 2, 2, 3, 3])
    fold = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    out, seen = b.token_identity_experts(ids, experts, fold, 4)
    # fold 0 tokens use fold 1's majority (5 -> 2, 7 -> 3); fold 1 tokens use fold 0's (5 -> 1, 7 -> 0);
    # id 9 is only in fold 1, so it gets fold 0's most used expert (1)
    np.testing.assert_array_equal(out, [2, 2, 2, 3, 1, 1, 1, 0])
    assert seen == pytest.approx(7 / 8)


def test_permutation_null_closed_form_and_seeding():
    labels = np.array([0, 0, 1, 1])

    def same(d):  # 1 when the shuffle reproduces the labels: probability 2! 2! / 4! = 1/6
        return float(np.array_equal(d, labels))

    null = b.document_permutation_null(labels, same, n_perm=6000, seed=3)
    assert null["observed"] == 1.0 and null["n_perm"] == 6000
    assert null["mean"] == pytest.approx(1 / 6, abs=0.015)
    assert null["p_value"] == pytest.approx(1 / 6, abs=0.015)  # P(null >= 1)
    assert b.document_permutation_null(labels, same, 6000, seed=3) == null
    vec = b.document_permutation_null(labels, lambda d: [same(d), 2.0], 50, seed=0)
    assert vec["p95"][1] == 2.0 and vec["p_value"][1] == 1.0  # a constant: every shuffle ties it
    none = b.document_permutation_null(labels, same, 0)
    assert math.isnan(none["mean"]) and none["n_perm"] == 0


def _routing(domain_Z, lens, token_ids, topk_NK, E=4) -> Routing:
    doc = np.repeat(np.arange(len(lens)), lens)
    n = len(doc)
    return Routing(
        domains=["a", "b", "c"][: int(max(domain_Z)) + 1],
        token_ids=np.asarray(token_ids),
        domain=np.asarray(domain_Z)[doc],
        doc=doc,
        block=np.zeros(n, int),
        pos=np.arange(n),
        token_type=np.full(n, -1),
        nll=np.zeros(n),
        num_experts=E,
        top_k=topk_NK.shape[1],
        topk={0: topk_NK},
    )


def _docs(rng, num_docs=60, vocab=30):
    domain_Z = np.arange(num_docs) % 3
    lens = rng.integers(30, 60, num_docs)
    dom_N = np.repeat(domain_Z, lens)
    return domain_Z, lens, dom_N, rng.integers(0, vocab, len(dom_N))


def test_domain_routing_beats_every_baseline():
    # tokens shared by all domains, experts chosen by domain (second choice: the next expert)
    rng = np.random.default_rng(4)
    domain_Z, lens, dom_N, ids = _docs(rng)
    e = np.where(rng.random(len(dom_N)) < 0.8, dom_N, rng.integers(0, 4, len(dom_N)))
    r = _routing(domain_Z, lens, ids, np.stack([e, (e + 1) % 4], 1))
    info = ds.domain_information(r, 0, n_boot=50, seed=0)
    assert info["domain_nmi"]["value"] == pytest.approx(
        m.normalized_mutual_information(m.joint_counts(dom_N, e, 3, 4))
    )
    assert info["domain_nmi_topk"]["value"] == pytest.approx(
        m.normalized_mutual_information(m.joint_counts(dom_N, r.topk[0], 3, 4))
    )
    out = ds.null_baselines(r, 0, n_boot=50, n_perm=200, seed=0, min_count=10)
    null = out["null_permutation"]
    assert null["domain_nmi"]["observed"] == pytest.approx(info["domain_nmi"]["value"])
    assert null["domain_nmi"]["p_value"] == pytest.approx(1 / 201)
    # 20 documents per domain: shuffles still leave chance imbalances of true domains, so the null is not 0
    assert (
        0 < null["domain_nmi"]["mean"] < null["domain_nmi"]["p95"] < 0.1 < 0.4 < info["domain_nmi"]["value"]
    )
    assert out["token_identity_nmi"]["value"] < 0.05  # token ids carry no domain information here
    cmi = out["domain_cmi_given_token"]
    assert cmi["num_token_ids"] == 30 and cmi["token_frac"] == 1.0
    assert cmi["excess_over_null"] > 0.3 and null["domain_cmi_given_token"]["p_value"] == pytest.approx(
        1 / 201
    )
    assert cmi["value"] <= cmi["h_domain_given_token"] <= math.log(3) + 1e-12


def test_token_routing_is_explained_by_the_token_identity_baseline():
    # each domain has its own token ids and the expert is a function of the id: all domain signal is token
    rng = np.random.default_rng(5)
    domain_Z, lens, dom_N, ids = _docs(rng, vocab=10)
    ids = ids + 10 * dom_N
    e = ids % 4
    r = _routing(domain_Z, lens, ids, e[:, None])
    nmi = ds.domain_information(r, 0, 20, 0)["domain_nmi"]["value"]
    out = ds.null_baselines(r, 0, n_boot=20, n_perm=100, seed=0, min_count=10)
    assert out["token_identity_nmi"]["value"] == pytest.approx(nmi)  # the same expert for every token
    assert out["domain_cmi_given_token"]["value"] == pytest.approx(0.0, abs=1e-12)
    assert out["domain_cmi_given_token"]["excess_over_null"] <= 0


def test_cmi_min_count_filter_and_no_frequent_ids():
    rng = np.random.default_rng(6)
    domain_Z, lens, dom_N, ids = _docs(rng, num_docs=6)
    r = _routing(domain_Z, lens, np.arange(len(dom_N)), dom_N[:, None])  # every id seen once
    cmi = ds.null_baselines(r, 0, 10, 10, 0, min_count=2)["domain_cmi_given_token"]
    assert cmi["num_token_ids"] == 0 and math.isnan(cmi["value"])


def test_step0_change_is_paired():
    rng = np.random.default_rng(7)
    domain_Z, lens, dom_N, ids = _docs(rng)
    final = _routing(domain_Z, lens, ids, np.where(rng.random(len(ids)) < 0.5, dom_N, 3)[:, None])
    start = _routing(domain_Z, lens, ids, rng.integers(0, 4, len(ids))[:, None])
    out = ds.step0_change(final, start, 0, n_boot=100, seed=0)
    n1 = ds.domain_information(final, 0, 0, 0)["domain_nmi"]["value"]
    n0 = ds.domain_information(start, 0, 0, 0)["domain_nmi"]["value"]
    assert out["domain_nmi"]["value"] == pytest.approx(n0)
    assert out["change_domain_nmi"]["value"] == pytest.approx(n1 - n0)
    assert 0 < out["change_domain_nmi"]["ci_low"] <= n1 - n0 <= out["change_domain_nmi"]["ci_high"]
    assert out["change_domain_nmi_topk"]["value"] == pytest.approx(n1 - n0)  # top-1: the same
    with pytest.raises(ValueError, match="same eval tokens"):
        ds.step0_change(final, _routing(domain_Z, lens, ids + 1, start.topk[0]), 0, 10, 0)


# ----------------------------------------------------------------------------- seeds


def test_sign_flip_closed_forms():
    assert sign_flip_test([0.3, 0.1, 0.2, 0.5, 0.4]) == {"p_value": 2 / 32, "n": 5, "n_flips": 32}
    # d = (1, 2, -0.5): |sum| = 2.5; of the 8 signed sums (+-3.5, +-2.5, +-1.5, +-0.5) four reach 2.5
    assert sign_flip_test([1.0, 2.0, -0.5])["p_value"] == 0.5
    assert sign_flip_test([0.0, 0.0])["p_value"] == 1.0
    assert sign_flip_test([-1.0] * 6)["p_value"] == pytest.approx(2 / 64)
    with pytest.raises(ValueError, match="1..20"):
        sign_flip_test([])
    with pytest.raises(ValueError, match="finite"):  # NaN gave p = 0, below the floor 2 / 2^n
        sign_flip_test([0.1, float("nan"), 0.2])


def test_sign_flip_matches_brute_force_enumeration():
    rng = np.random.default_rng(8)
    d = rng.normal(0.3, 1.0, 7)
    flips = [
        abs(sum(s * x for s, x in zip(signs, d, strict=True)))
        for signs in itertools.product([1, -1], repeat=7)
    ]
    expected = np.mean([f >= abs(d.sum()) - 1e-12 for f in flips])
    assert sign_flip_test(d)["p_value"] == pytest.approx(expected)


def test_paired_test_adds_the_p_value_to_the_t_interval():
    out = paired_test({0: 3.0, 1: 5.0, 2: 9.0, 3: 4.0}, {0: 1.0, 1: 2.0, 2: 1.0, 3: 3.5, 9: 0.0})
    assert out["n"] == 4 and out["value"] == pytest.approx((2 + 3 + 8 + 0.5) / 4)
    assert out["p_value"] == 2 / 16 and out["ci_low"] < out["value"] < out["ci_high"]


def test_nmi_figure_takes_an_interval_that_misses_its_point_estimate(tmp_path):
    """A percentile interval of few bootstrap resamples can lie wholly above or below the estimate: the
    figure draws it (no negative error bar), as ``analyze.py --bootstrap 5`` needs."""
    pytest.importorskip("matplotlib")
    from moe_emergence.analysis.figures import nmi_per_layer

    ci = {"value": 0.10, "ci_low": 0.11, "ci_high": 0.13, "n_boot": 5}  # the estimate below its interval
    out = nmi_per_layer({"run": {"0": ci, "1": {**ci, "ci_low": 0.02, "ci_high": 0.09}}}, tmp_path / "n.png")
    assert out.is_file() and out.stat().st_size > 0
