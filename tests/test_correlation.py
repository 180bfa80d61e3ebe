"""The analytic backward of the correlation log-determinant against autograd through a plain formula."""

import pytest
import torch

from hf_specvol.correlation import correlation_logdet
from hf_specvol.spectral import log_volume, spectral_penalty

EPS = 1e-4


def autograd_log_volume(W, eps=EPS):
    """float64 oracle: torch.corrcoef of the taller orientation's columns, logdet(R + eps I) / r, by autograd."""
    A = W if W.shape[0] >= W.shape[1] else W.T
    R = torch.corrcoef(A.T)
    return torch.logdet(R + eps * torch.eye(A.shape[1], dtype=A.dtype)) / A.shape[1]


def oracle_grad(W, eps=EPS):
    W64 = W.detach().double().requires_grad_()
    value = autograd_log_volume(W64, eps)
    (grad,) = torch.autograd.grad(value, W64)
    return value.detach(), grad


@pytest.mark.parametrize("shape", [(40, 12), (12, 40), (16, 16), (3, 2)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gradient_matches_autograd_oracle(shape, dtype):
    g = torch.Generator().manual_seed(shape[0] * 100 + shape[1])
    # correlated columns, so the gradient is far from zero
    W = (torch.randn(shape, generator=g, dtype=torch.float64) @ torch.randn(shape[1], shape[1], generator=g,
         dtype=torch.float64) + 3.0).to(dtype).requires_grad_()
    value = log_volume(W)
    (grad,) = torch.autograd.grad(value, W)
    expected_value, expected_grad = oracle_grad(W)
    tol = 1e-10 if dtype == torch.float64 else 2e-4
    assert float(value.detach()) == pytest.approx(float(expected_value), rel=tol, abs=tol)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.double(), expected_grad, rtol=tol, atol=tol * float(expected_grad.abs().max()))


def test_batched_and_transposed_views_match_oracle_per_matrix():
    g = torch.Generator().manual_seed(3)
    storage = torch.randn(3, 7, 20, generator=g, dtype=torch.float64)
    A = storage.mT.clone().requires_grad_()  # (3, 20, 7)
    upstream = torch.tensor([0.5, -2.0, 1.0], dtype=torch.float64)
    (correlation_logdet(A.mT.contiguous().mT, EPS) * upstream).sum().backward()
    for b in range(3):
        _, expected = oracle_grad(A[b].detach())
        torch.testing.assert_close(A.grad[b], upstream[b] * expected, rtol=1e-9, atol=1e-12)


def test_penalty_gradient_over_mixed_orientations_matches_oracle():
    # Conv1D-like weights are applied transposed; stacks follow storage, square ones included.
    g = torch.Generator().manual_seed(4)
    as_applied = {"conv1d_like": torch.t, "linear": lambda w: w, "square": lambda w: w, "square_t": torch.t,
                  "other_shape": torch.t}
    shapes = {"conv1d_like": (6, 15), "linear": (15, 6), "square": (5, 5), "square_t": (5, 5), "other_shape": (4, 9)}
    leaves = {k: torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True) for k, s in shapes.items()}
    spectral_penalty({k: as_applied[k](w) for k, w in leaves.items()}).backward()
    for name, leaf in leaves.items():
        def oracle(w, name=name):
            return -autograd_log_volume(as_applied[name](w)) / len(leaves)

        w = leaf.detach().clone().requires_grad_()
        (expected,) = torch.autograd.grad(oracle(w), w)
        torch.testing.assert_close(leaf.grad, expected, rtol=1e-9, atol=1e-12)


def test_rejects_wide_or_integer_input():
    with pytest.raises(ValueError, match="transpose"):
        correlation_logdet(torch.randn(2, 5))
    with pytest.raises(ValueError, match="float32 or float64"):
        correlation_logdet(torch.ones(5, 2, dtype=torch.int64))


def test_square_wide_matrix_uses_triangular_solves_and_matches_oracle():
    # r > 128 and m < 2 r: the backward solves with the Cholesky factor instead of forming the inverse.
    from hf_specvol.correlation import _use_explicit_inverse

    W = torch.randn(150, 130, generator=torch.Generator().manual_seed(5), dtype=torch.float64, requires_grad=True)
    assert not _use_explicit_inverse(150, 130) and _use_explicit_inverse(300, 130)
    value = log_volume(W)
    (grad,) = torch.autograd.grad(value, W)
    expected_value, expected_grad = oracle_grad(W)
    assert float(value.detach()) == pytest.approx(float(expected_value), rel=1e-10)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-8, atol=1e-10 * float(expected_grad.abs().max()))


@pytest.mark.parametrize("rows", [30, 6])
def test_gradient_after_jitter_retry_is_that_of_the_returned_value(rows):
    # eps = -0.5 makes R + eps I indefinite: the factorization fails until the last retry adds 1.0, so the
    # returned value is logdet(R + ridge I) / r with ridge = -0.5 + the jitters; its gradient must follow.
    g = torch.Generator().manual_seed(6)
    # correlated columns: R has eigenvalues far below 0.5
    A = (torch.randn(rows, 1, generator=g, dtype=torch.float64)
         + 0.1 * torch.randn(rows, 6, generator=g, dtype=torch.float64)).requires_grad_()
    value = correlation_logdet(A, eps=-0.5)
    (grad,) = torch.autograd.grad(value, A)
    base = 6 * torch.finfo(torch.float64).eps
    ridge = -0.5 + sum(base * 10.0**j for j in range(1, 4)) + 1.0
    A64 = A.detach().clone().requires_grad_()
    expected = torch.logdet(torch.corrcoef(A64.T) + ridge * torch.eye(6, dtype=torch.float64)) / 6
    (expected_grad,) = torch.autograd.grad(expected, A64)
    assert float(value.detach()) == pytest.approx(float(expected.detach()), rel=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-12)


def test_padded_batch_of_different_heights_matches_oracle_per_matrix():
    g = torch.Generator().manual_seed(7)
    heights = [9, 20, 6]
    mats = [torch.randn(h, 6, generator=g, dtype=torch.float64) for h in heights]
    A = torch.zeros(3, 20, 6, dtype=torch.float64)
    for b, w in enumerate(mats):
        A[b, : w.shape[0]] = w
    A.requires_grad_()
    upstream = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    values = correlation_logdet(A, EPS, rows=torch.tensor(heights))
    (values * upstream).sum().backward()
    for b, w in enumerate(mats):
        expected_value, expected_grad = oracle_grad(w)
        assert float(values[b].detach()) == pytest.approx(float(expected_value), rel=1e-10)
        torch.testing.assert_close(A.grad[b, : heights[b]], upstream[b] * expected_grad, rtol=1e-8, atol=1e-12)
        if heights[b] < 20:
            assert A.grad[b, heights[b]:].abs().max() <= 1e-12 * A.grad[b].abs().max()  # round-off only


def test_small_matrices_of_one_width_share_one_call_and_match_oracle(monkeypatch):
    from hf_specvol import spectral

    calls = []
    original = spectral.correlation_logdet
    monkeypatch.setattr(spectral, "correlation_logdet", lambda A, eps, rows=None: calls.append(A.shape) or
                        original(A, eps, rows=rows))
    g = torch.Generator().manual_seed(8)
    # GPT-2-like: Conv1D weights stored (in, out) and applied transposed, plus one square matrix
    leaves = {"qkv": (8, 24), "proj": (8, 8), "fc": (8, 32), "fc_proj": (32, 8)}
    leaves = {k: torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True) for k, s in leaves.items()}
    penalty = spectral_penalty({k: w.t() for k, w in leaves.items()})
    assert calls == [(4, 32, 8)]  # one padded batch of the four heights 24, 8, 32, 32
    penalty.backward()
    for leaf in leaves.values():
        w = leaf.detach().clone().requires_grad_()
        expected = -autograd_log_volume(w.t()) / len(leaves)
        (expected_grad,) = torch.autograd.grad(expected, w)
        torch.testing.assert_close(leaf.grad, expected_grad, rtol=1e-8, atol=1e-12)
    assert float(penalty.detach()) == pytest.approx(
        -sum(float(autograd_log_volume(w.detach().t())) for w in leaves.values()) / 4, rel=1e-10)


def test_large_padding_keeps_one_call_per_shape(monkeypatch):
    from hf_specvol import spectral

    shapes = []
    original = spectral.log_volume
    monkeypatch.setattr(spectral, "log_volume", lambda W, eps: shapes.append(tuple(W.shape)) or original(W, eps))
    g = torch.Generator().manual_seed(9)
    # width 64: padding 64 rows up to 2000 would cost 1936 * 64^2 = 7.9M extra multiply-adds, over the budget
    spectral_penalty([torch.randn(64, 64, generator=g), torch.randn(2000, 64, generator=g)])
    assert sorted(shapes) == [(1, 64, 64), (1, 2000, 64)]
