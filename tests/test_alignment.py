from typing import get_args

import numpy as np
import pytest
import torch

from guidance_tune.config import GuidanceConfig, RunConfig
from guidance_tune.guidance.alignment import (
    METRICS,
    debiased_cka,
    gram,
    linear_cka,
    paired_similarities,
    rsa,
)


def _features(b=32, d=20, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, generator=generator, dtype=dtype)


def _feature_space_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Kornblith et al. 2019, feature form, float64: an independent formula."""
    x = x - x.mean(0)
    y = y - y.mean(0)
    cross = np.linalg.norm(y.T @ x) ** 2
    return cross / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


def _unbiased_hsic(k: np.ndarray, m: np.ndarray) -> float:
    """Song et al. 2012, eq. 5, written out directly."""
    n = k.shape[0]
    k = k.copy()
    m = m.copy()
    np.fill_diagonal(k, 0)
    np.fill_diagonal(m, 0)
    ones = np.ones(n)
    value = np.trace(k @ m)
    value += (ones @ k @ ones) * (ones @ m @ ones) / ((n - 1) * (n - 2))
    value -= 2 / (n - 2) * (ones @ k @ m @ ones)
    return value / (n * (n - 3))


def test_cka_matches_float64_feature_space_formula():
    x = _features(seed=1, dtype=torch.float32)
    y = torch.relu(_features(d=50, seed=2, dtype=torch.float32)) + 0.5 * x[:, :1]
    expected = _feature_space_cka(x.double().numpy(), y.double().numpy())
    assert linear_cka(x, y).item() == pytest.approx(expected, abs=1e-5)


def test_cka_of_a_batch_with_itself_is_one():
    x = _features()
    assert linear_cka(x, x).item() == pytest.approx(1.0, abs=1e-12)


def test_cka_is_invariant_to_orthogonal_transforms_and_isotropic_scaling():
    x = _features(seed=3)
    y = _features(d=15, seed=4) + x[:, :15]
    q, _ = torch.linalg.qr(_features(b=20, d=20, seed=5))
    reference = linear_cka(x, y)
    assert linear_cka(x @ q, y).item() == pytest.approx(reference.item(), abs=1e-10)
    assert linear_cka(7.5 * x, 0.01 * y).item() == pytest.approx(reference.item(), abs=1e-10)


def test_cka_of_image_shaped_activations_flattens_them():
    x = _features(b=8, d=2 * 3 * 3).reshape(8, 2, 3, 3)
    y = _features(b=8, d=5, seed=9)
    expected = _feature_space_cka(x.reshape(8, -1).numpy(), y.numpy())
    assert linear_cka(x, y).item() == pytest.approx(expected, abs=1e-10)


def test_debiased_cka_matches_its_float64_definition():
    x = _features(seed=6)
    y = _features(d=30, seed=7) + 0.3 * torch.cat([x, x[:, :10]], 1)
    kx = (x @ x.T).numpy()
    ky = (y @ y.T).numpy()
    expected = _unbiased_hsic(kx, ky) / np.sqrt(_unbiased_hsic(kx, kx) * _unbiased_hsic(ky, ky))
    assert debiased_cka(x, y).item() == pytest.approx(expected, abs=1e-10)


def test_debiased_cka_is_near_zero_for_independent_features_where_biased_cka_is_not():
    x = _features(b=256, d=1024, seed=8, dtype=torch.float32)
    y = _features(b=256, d=1024, seed=9, dtype=torch.float32)
    assert abs(debiased_cka(x, y).item()) < 0.03
    assert linear_cka(x, y).item() > 0.75  # the biased floor at b=256, d=1024


def test_rsa_is_pearson_correlation_of_cosine_similarity_matrices():
    x = _features(seed=10)
    y = _features(d=12, seed=11) + x[:, :12]

    def cosine(a):
        a = a / np.linalg.norm(a, axis=1, keepdims=True)
        return (a @ a.T).ravel()

    expected = np.corrcoef(cosine(x.numpy()), cosine(y.numpy()))[0, 1]
    assert rsa(x, y).item() == pytest.approx(expected, abs=1e-10)


@pytest.mark.parametrize("name", sorted(METRICS))
def test_gradient_matches_finite_differences(name):
    x = _features(b=6, d=5, seed=12).requires_grad_()
    y = _features(b=6, d=4, seed=13)
    assert torch.autograd.gradcheck(lambda a: METRICS[name](a, y), (x,))


@pytest.mark.parametrize("name", sorted(METRICS))
def test_constant_activations_give_finite_loss_and_gradient(name):
    x = torch.ones(8, 16, requires_grad=True)
    y = _features(b=8, d=6, seed=14, dtype=torch.float32)
    loss = 1 - METRICS[name](x, y)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("name", sorted(METRICS))
def test_bf16_activations_give_the_fp32_answer(name):
    x = torch.relu(_features(b=64, d=512, seed=15, dtype=torch.float32)) + 3.0
    y = torch.relu(_features(b=64, d=256, seed=16, dtype=torch.float32) + x[:, :256])
    full = METRICS[name](x, y)
    half = METRICS[name](x.bfloat16(), y.bfloat16())
    assert half.dtype == torch.float32
    assert half.item() == pytest.approx(full.item(), abs=1e-3)


def test_gram_stays_fp32_under_bf16_autocast():
    x = _features(b=16, d=64, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert gram(x).dtype == torch.float32


@pytest.mark.parametrize(
    ("name", "too_small"),
    [("cka", 1), ("rsa", 2), ("debiased_cka", 3), ("ridge", 1), ("procrustes", 1)],
)
def test_batch_too_small_for_the_estimator_is_a_clear_error(name, too_small):
    x = _features(b=too_small, d=4)
    with pytest.raises(ValueError, match="at least"):
        METRICS[name](x, x)


def test_paired_similarities_reduce_all_pairs_at_once():
    xs = [_features(b=10, d=6, seed=s) for s in range(3)]
    ys = [_features(b=10, d=9, seed=10 + s) for s in range(3)]
    represent = METRICS["cka"].represent
    batched = paired_similarities(
        torch.stack([represent(x) for x in xs]), torch.stack([represent(y) for y in ys])
    )
    one_by_one = torch.stack([linear_cka(x, y) for x, y in zip(xs, ys, strict=True)])
    torch.testing.assert_close(batched, one_by_one)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gram_gradient_matches_autograd_in_the_activation_dtype(dtype):
    x = torch.relu(_features(b=12, d=40, seed=20, dtype=torch.float32)).to(dtype)
    weights = _features(b=12, d=12, seed=21, dtype=torch.float32)
    ours = x.clone().requires_grad_()
    (gram(ours) * weights).sum().backward()
    reference = x.double().requires_grad_()
    (reference @ reference.T * weights.double()).sum().backward()
    assert ours.grad.dtype == dtype
    torch.testing.assert_close(ours.grad.double(), reference.grad, rtol=1e-2, atol=1e-2)
    if dtype == torch.float32:
        torch.testing.assert_close(ours.grad.double(), reference.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("side", ["target", "guide"])
@pytest.mark.parametrize("name", sorted(METRICS))
def test_a_stack_of_grams_finishes_like_each_gram_alone(name, side):
    """Batching must not mix layers: a constant layer's floor and a huge layer's scale stay its
    own."""
    activations = [
        torch.ones(8, 5, dtype=torch.float64),
        1e4 * _features(b=8, d=30, seed=22),
        torch.relu(_features(b=8, d=7, seed=23)),
    ]
    from_gram = getattr(METRICS[name], f"{side}_from_gram")
    stacked = from_gram(torch.stack([gram(a) for a in activations]))
    alone = torch.stack([from_gram(gram(a)) for a in activations])
    torch.testing.assert_close(stacked, alone)


@pytest.mark.parametrize("name", sorted(METRICS))
def test_a_stack_of_pairs_reduces_like_each_pair_alone(name):
    metric = METRICS[name]
    targets = [_features(b=10, d=6, seed=s) for s in range(3)]
    guides = [torch.relu(_features(b=10, d=9, seed=10 + s)) for s in range(3)]
    batched = metric.pair(
        metric.target_from_gram(torch.stack([gram(x) for x in targets])),
        metric.guide_from_gram(torch.stack([gram(y) for y in guides])),
    )
    one_by_one = torch.stack([metric(x, y) for x, y in zip(targets, guides, strict=True)])
    torch.testing.assert_close(batched, one_by_one)


@pytest.mark.parametrize("name", sorted(METRICS))
def test_the_config_offers_every_metric_and_refuses_batches_it_cannot_use(name):
    assert set(get_args(GuidanceConfig.model_fields["metric"].annotation)) == set(METRICS)
    minimum = METRICS[name].min_batch
    RunConfig(guidance={"metric": name}, train={"batch_size": minimum})
    with pytest.raises(ValueError, match=f"at least {minimum}"):
        RunConfig(guidance={"metric": name}, train={"batch_size": minimum - 1})
