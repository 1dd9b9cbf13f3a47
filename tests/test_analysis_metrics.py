"""Analysis metrics against hand-computed cases, and the document bootstrap."""

import math

import numpy as np
import pytest

from moe_emergence.analysis import metrics as m


def test_expert_usage_and_joint_counts():
    topk = np.array([[0, 1], [0, 2], [1, 2], [0, 1]])
    np.testing.assert_allclose(m.expert_usage(topk, 4), [3 / 8, 3 / 8, 2 / 8, 0])
    counts = m.joint_counts(np.array([0, 0, 1, 1]), topk, 2, 3)
    np.testing.assert_array_equal(counts, [[2, 1, 1], [1, 2, 1]])
    np.testing.assert_array_equal(
        m.joint_counts(np.array([0, 1, 1]), np.array([2, 0, 0]), 2, 3), [[0, 0, 1], [2, 0, 0]]
    )
    np.testing.assert_allclose(m.row_fractions([[2, 2], [0, 0]]), [[0.5, 0.5], [0, 0]])


def test_independent_domain_and_expert_give_zero_mi():
    counts = np.outer([1, 2, 3], [2, 4, 1, 5]).astype(float)  # p(d, e) = p(d) p(e)
    assert m.mutual_information(counts) == pytest.approx(0.0, abs=1e-12)
    assert m.normalized_mutual_information(counts) == pytest.approx(0.0, abs=1e-12)


def test_one_to_one_map_gives_nmi_one():
    counts = np.zeros((3, 5))
    counts[0, 3], counts[1, 0], counts[2, 4] = 10, 7, 3  # each domain always to its own expert
    assert m.normalized_mutual_information(counts) == pytest.approx(1.0)
    assert m.mutual_information(counts) == pytest.approx(m.entropy([10, 7, 3]))
    assert m.symmetric_nmi(counts) == pytest.approx(1.0)


def test_small_hand_computed_mi():
    # p = [[1/3, 1/6], [1/6, 1/3]], marginals 1/2: I = 2 (1/3) ln(4/3) + 2 (1/6) ln(2/3)
    expected = (2 / 3) * math.log(4 / 3) + (1 / 3) * math.log(2 / 3)
    assert m.mutual_information([[2, 1], [1, 2]]) == pytest.approx(expected)
    assert expected == pytest.approx(0.05663, abs=1e-5)
    assert m.normalized_mutual_information([[2, 1], [1, 2]]) == pytest.approx(expected / math.log(2))
    assert m.entropy([1, 1, 2]) == pytest.approx(-(2 * 0.25 * math.log(0.25) + 0.5 * math.log(0.5)))
    assert m.normalized_mutual_information([[5, 3]]) == 0.0  # a single domain has H = 0


def test_domain_specialization_and_baseline():
    topk = np.array([[0, 1], [0, 2], [1, 2], [0, 1]])
    counts = m.joint_counts(np.array([0, 0, 1, 1]), topk, 2, 3)
    spec = m.domain_specialization(counts, np.array([2, 2]))
    np.testing.assert_allclose(spec, [[1.0, 0.5, 0.5], [0.5, 1.0, 0.5]])
    np.testing.assert_allclose(spec.sum(1), 2.0)  # rows sum to k
    assert m.uniform_baseline(2, 8) == 0.25


def test_vocabulary_specialization():
    ids = np.array([5] * 10 + [7] * 10 + [9] * 3)
    top1 = np.array([1] * 10 + [0] * 6 + [2] * 4 + [0, 1, 2])[:, None]
    value, n = m.vocabulary_specialization(ids, top1, 3, min_count=10)
    assert (value, n) == (pytest.approx((1.0 + 0.6) / 2), 2)  # id 9 is too rare to count
    assert math.isnan(m.vocabulary_specialization(ids, top1, 3, min_count=11)[0])


def test_coactivation():
    c = m.coactivation(np.array([[0, 1], [0, 1], [0, 2], [1, 2]]), 3)
    np.testing.assert_allclose(c, [[0, 2 / 3, 1 / 3], [2 / 3, 0, 1 / 3], [1 / 2, 1 / 2, 0]])
    assert not m.coactivation(np.array([[0], [1]]), 3).any()


def test_router_saturation():
    a = np.array([[0, 1], [2, 3], [1, 0]])
    b = np.array([[1, 0], [2, 1], [3, 2]])
    sat = m.router_saturation(a, b)
    assert sat["same_set"] == pytest.approx(1 / 3)
    assert sat["overlap"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert m.router_saturation(a, a) == {"same_set": 1.0, "overlap": 1.0}
    with pytest.raises(ValueError, match="shapes differ"):
        m.router_saturation(a, b[:, :1])


def test_cross_layer_nmi():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 4, 5000)
    res = m.cross_layer_nmi({3: x, 1: (x + 1) % 4, 5: rng.integers(0, 4, 5000)}, 4)
    assert set(res) == {(1, 3), (1, 5), (3, 5)}
    assert res[(1, 3)] == pytest.approx(1.0)
    assert res[(1, 5)] < 0.01 and res[(3, 5)] < 0.01


def test_weight_divergence():
    w = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]])
    d = m.cosine_distance_matrix(w)
    np.testing.assert_allclose(d[0, 1], 0.0, atol=1e-12)
    np.testing.assert_allclose(d[0, 2], 1.0)
    np.testing.assert_allclose(d[0, 3], 2.0)
    assert m.mean_pairwise(d) == pytest.approx((0 + 1 + 2 + 1 + 2 + 1) / 6)
    np.testing.assert_allclose(m.distance_from_parent(w, np.array([2.0, 0.0])), [0, 0, 1, 2], atol=1e-12)


def _synthetic(num_docs: int, seed: int):
    """Documents of 3 domains; each token goes to its domain's expert with prob 0.6, else uniform."""
    rng = np.random.default_rng(seed)
    doc_dom = np.arange(num_docs) % 3
    lens = rng.integers(20, 60, num_docs)
    doc = np.repeat(np.arange(num_docs), lens)
    dom = doc_dom[doc]
    exp = np.where(rng.random(len(doc)) < 0.6, dom, rng.integers(0, 4, len(doc)))
    return doc, dom, exp, doc_dom


def test_bootstrap_ci_contains_point_and_narrows_with_more_documents():
    widths = []
    for n_docs in (15, 300):
        doc, dom, exp, doc_dom = _synthetic(n_docs, 1)
        tables, docs = m.per_document_tables(doc, dom, exp, (3, 4))
        assert tables.sum() == len(doc)
        np.testing.assert_array_equal(docs, np.arange(n_docs))
        ci = m.bootstrap_ci(tables, m.normalized_mutual_information, 300, seed=0, strata_Z=doc_dom)
        assert ci["value"] == pytest.approx(m.normalized_mutual_information(m.joint_counts(dom, exp, 3, 4)))
        assert ci["ci_low"] <= ci["value"] <= ci["ci_high"]
        assert ci["ci_low"] > 0
        widths.append(ci["ci_high"] - ci["ci_low"])
    assert widths[1] < widths[0] / 2
    again = m.bootstrap_ci(tables, m.normalized_mutual_information, 300, seed=0, strata_Z=doc_dom)
    assert again == ci  # seeded


def test_bootstrap_vector_statistic_and_per_document_sums():
    doc = np.array([0, 0, 1, 2, 2, 2])
    dom = np.array([0, 0, 1, 0, 0, 0])
    vals = np.stack([np.ones(6), np.array([1.0, 3.0, 5.0, 4.0, 4.0, 4.0])], 1)
    sums, docs = m.per_document_sums(doc, dom, vals, 2)
    np.testing.assert_allclose(sums[0], [[2, 4], [0, 0]])
    np.testing.assert_allclose(sums[1], [[0, 0], [1, 5]])
    ci = m.bootstrap_ci(sums, lambda t: t[:, 1] / t[:, 0], 200, seed=3, strata_Z=np.array([0, 1, 0]))
    assert ci["value"] == pytest.approx([16 / 5, 5.0])
    assert ci["ci_low"][1] == ci["ci_high"][1] == pytest.approx(5.0)  # one document: no spread
    assert 2.0 <= ci["ci_low"][0] < 16 / 5 < ci["ci_high"][0] <= 4.0  # doc means 2 and 4
    none = m.bootstrap_ci(sums, lambda t: t[:, 1] / np.maximum(t[:, 0], 1), 0)
    assert math.isnan(none["ci_low"][0]) and none["n_boot"] == 0


def test_seed_mean_ci_closed_form_and_coverage():
    from moe_emergence.analysis.seeds import mean_ci, paired_diff_ci, t975

    # closed form: values 1, 2, 3 -> mean 2, s = 1, half width t_{0.975,2} / sqrt(3)
    ci = mean_ci([1.0, 2.0, 3.0])
    assert ci["n"] == 3 and ci["value"] == 2.0
    assert abs(ci["ci_high"] - 2.0 - 4.303 / np.sqrt(3)) < 1e-12
    assert np.isnan(mean_ci([5.0])["ci_low"])
    assert paired_diff_ci({0: 3.0, 1: 5.0, 2: 9.0}, {0: 1.0, 1: 2.0})["value"] == 2.5
    with pytest.raises(ValueError, match="no common seed"):
        paired_diff_ci({0: 1.0}, {1: 1.0})
    # the tabulated quantiles give ~95% coverage of the true mean for normal samples of size 2, 3 and 8
    rng = np.random.default_rng(0)
    for n in (2, 3, 8):
        x = rng.normal(1.0, 2.0, size=(20000, n))
        half = t975(n - 1) * x.std(axis=1, ddof=1) / np.sqrt(n)
        covered = np.abs(x.mean(axis=1) - 1.0) <= half
        assert abs(covered.mean() - 0.95) < 0.006, (n, covered.mean())
