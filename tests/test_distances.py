"""Ridge and Procrustes from Grams against their b x d definitions, and the analysis measures."""

import pytest
import torch

from guidance_tune.config import GuidanceConfig
from guidance_tune.guidance.alignment import MEASURES, METRICS, get_metric, gram

# (b, target width, guide width): wide, and b > d (rank-deficient Grams, repeated zero
# eigenvalues) down to a target of 3 features for 64 samples
SHAPES = [(12, 30, 20), (40, 10, 7), (64, 3, 2)]
DEFAULT_LAMBDA = GuidanceConfig().ridge_lambda


def _features(b, d, seed):
    return torch.randn(b, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _related(b, dx, dy, seed=0):
    """A target and a guide that share part of their signal."""
    x = _features(b, dx, seed)
    y = _features(b, dy, seed + 1) + x @ _features(dx, dy, seed + 2) / dx**0.5 + 2.0
    return x, y


def _textbook_ridge_r2(x, y, ridge_lambda):
    """Ridge fit of centred y from centred x with penalty ridge_lambda * ||xc||^2 / b, solved
    in feature space: 1 - ||yc - xc w||^2 / ||yc||^2."""
    xc, yc = x - x.mean(0), y - y.mean(0)
    penalty = ridge_lambda * (xc * xc).sum() / x.shape[0]
    eye = torch.eye(x.shape[1], dtype=x.dtype)
    weights = torch.linalg.solve(xc.T @ xc + penalty * eye, xc.T @ yc)
    return 1 - ((yc - xc @ weights) ** 2).sum() / (yc * yc).sum()


def _textbook_procrustes(x, y):
    """Nuclear norm of xc^T yc (singular values) over ||xc|| ||yc||."""
    xc, yc = x - x.mean(0), y - y.mean(0)
    return torch.linalg.svdvals(xc.T @ yc).sum() / (xc.norm() * yc.norm())


TEXTBOOK = {
    "ridge": lambda x, y: _textbook_ridge_r2(x, y, DEFAULT_LAMBDA),
    "procrustes": _textbook_procrustes,
}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", sorted(TEXTBOOK))
def test_value_and_gradient_match_the_b_by_d_definition(name, shape):
    x, y = _related(*shape)
    ours = x.clone().requires_grad_()
    reference = x.clone().requires_grad_()
    value = METRICS[name](ours, y)
    expected = TEXTBOOK[name](reference, y)
    value.backward()
    expected.backward()
    assert value.item() == pytest.approx(expected.item(), abs=1e-10)
    assert torch.isfinite(ours.grad).all()
    torch.testing.assert_close(ours.grad, reference.grad, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("ridge_lambda", [1e-3, 0.3, 10.0])
def test_ridge_penalty_is_the_configured_relative_one(ridge_lambda):
    x, y = _related(40, 10, 7)
    expected = _textbook_ridge_r2(x, y, ridge_lambda).item()
    assert get_metric("ridge", ridge_lambda)(x, y).item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("name", sorted(TEXTBOOK))
def test_invariant_to_orthogonal_transforms_and_isotropic_scaling(name):
    x, y = _related(32, 12, 9)
    rotate_x, _ = torch.linalg.qr(_features(12, 12, 7))
    rotate_y, _ = torch.linalg.qr(_features(9, 9, 8))
    reference = METRICS[name](x, y).item()
    assert METRICS[name](x @ rotate_x, y @ rotate_y).item() == pytest.approx(reference, abs=1e-6)
    assert METRICS[name](250.0 * x, 1e-3 * y).item() == pytest.approx(reference, abs=1e-6)
    assert METRICS[name](x + 5.0, y - 3.0).item() == pytest.approx(reference, abs=1e-6)


def test_ridge_fits_the_guide_from_the_target_not_the_other_way():
    x = _features(64, 12, 9)
    y = x[:, :3] @ _features(3, 3, 10)  # a function of three of the target's features
    forward = get_metric("ridge", 1e-4)(x, y).item()
    backward = get_metric("ridge", 1e-4)(y, x).item()
    assert forward > 0.999
    assert backward < 0.5


def test_an_exactly_linear_guide_is_fitted_near_perfectly_with_a_small_penalty():
    x = _features(64, 8, 11)
    y = x @ _features(8, 5, 12)
    assert get_metric("ridge", 1e-4)(x, y).item() == pytest.approx(1.0, abs=1e-3)
    # the penalty shrinks the fit, so a large one leaves a residual even here
    assert get_metric("ridge", 10.0)(x, y).item() < 0.95


def test_procrustes_is_one_up_to_rotation_scale_and_shift_and_below_one_otherwise():
    x = _features(32, 6, 13)
    rotation, _ = torch.linalg.qr(_features(6, 6, 14))
    assert METRICS["procrustes"](x, 3.0 * x @ rotation + 1.0).item() == pytest.approx(1.0)
    x, y = _related(32, 6, 6)
    assert 0 < METRICS["procrustes"](x, y).item() < 0.99


def test_procrustes_similarity_gives_the_least_squares_distance_over_rotations():
    """||xn R - yn||^2 at the best rotation R = U V^T (svd of xn^T yn), for centred,
    unit-norm xn, yn, is 2 - 2 * similarity."""
    x, y = _related(32, 6, 6, seed=15)
    xn, yn = x - x.mean(0), y - y.mean(0)
    xn, yn = xn / xn.norm(), yn / yn.norm()
    u, _, vh = torch.linalg.svd(xn.T @ yn)
    distance = ((xn @ u @ vh - yn) ** 2).sum().item()
    assert distance == pytest.approx(2 - 2 * METRICS["procrustes"](x, y).item(), abs=1e-6)


@pytest.mark.parametrize("name", sorted(TEXTBOOK))
def test_rank_deficient_fp32_batches_give_finite_gradients(name):
    """b > d twice over, with duplicated samples (exactly repeated eigenvalues), in fp32."""
    x = torch.relu(_features(48, 4, 16).float())
    x = torch.cat([x, x[:16]]).requires_grad_()
    y = torch.relu(_features(64, 3, 17).float())
    (1 - METRICS[name](x, y)).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_measures_cover_every_metric_as_a_function_of_two_raw_grams():
    assert set(MEASURES) == {"cka", "debiased_cka", "rsa", "ridge", "procrustes"}
    x, y = _related(24, 10, 8)
    for name, measure in MEASURES.items():
        value = measure(gram(x), gram(y))
        assert value.shape == () and value.dtype == torch.float64  # the Grams' own
        assert value.item() == pytest.approx(METRICS[name](x, y).item(), abs=1e-12)
    assert MEASURES["ridge"](gram(x), gram(y)) != MEASURES["ridge"](gram(y), gram(x))
