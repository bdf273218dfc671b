import math

import pytest
import torch

from sketchwalk import SketchWalkConfig
from sketchwalk.selection.sketch import (
    block_logits,
    block_pool,
    hadamard_matrix,
    hadamard_sketch,
    sketch_draws,
)


@pytest.mark.parametrize("t, bs", [(10, 4), (12, 4), (3, 8), (64, 64), (65, 64), (1, 1)])
@pytest.mark.parametrize("parity", [False, True])
def test_block_pool_brute_force(t, bs, parity):
    x = torch.randn(2, 3, t, 5, generator=torch.Generator().manual_seed(t))
    got = block_pool(x, bs, parity=parity)
    nb = -(-t // bs)
    assert got.shape == (2, 3, nb, 5)
    for i in range(nb):
        rows = x[:, :, i * bs : min(t, (i + 1) * bs)]
        divisor = bs if parity else rows.shape[2]
        want = rows.sum(2) / divisor
        torch.testing.assert_close(got[:, :, i], want)


@pytest.mark.parametrize("n", [1, 2, 4, 64, 128])
def test_hadamard_matrix_is_orthogonal_up_to_n(n):
    h = hadamard_matrix(n)
    assert set(h.unique().tolist()) <= {-1.0, 1.0}
    torch.testing.assert_close(h @ h.T, n * torch.eye(n))


def test_hadamard_matrix_rejects_non_powers_of_two():
    with pytest.raises(ValueError, match="power of two"):
        hadamard_matrix(96)


@pytest.mark.parametrize("d", [64, 128, 80])
def test_full_sketch_is_an_exact_rotation(d):
    n = 1 << (d - 1).bit_length()
    draws = sketch_draws(d, sketch_dim=n, seed=3, layer_idx=5)
    x = torch.randn(20, d, dtype=torch.float64).float()
    y = torch.randn(20, d).float()
    xs, ys = hadamard_sketch(x, draws), hadamard_sketch(y, draws)
    torch.testing.assert_close(xs @ ys.T, x @ y.T, atol=1e-4, rtol=1e-4)
    # sketch_dim above the padded dim is clamped to it
    assert sketch_draws(d, sketch_dim=4 * n, seed=3, layer_idx=5).r == n


def test_sketch_preserves_inner_products_in_expectation():
    d, r = 128, 32
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(d, generator=gen)
    y = x + 0.5 * torch.randn(d, generator=gen)
    xy = torch.stack([x, y])
    estimates = []
    for s in range(2000):
        xs, ys = hadamard_sketch(xy, sketch_draws(d, r, seed=s, layer_idx=0))
        estimates.append(float(xs @ ys))
    estimates = torch.tensor(estimates)
    exact = float(x @ y)
    stderr = float(estimates.std()) / math.sqrt(len(estimates))
    print(f"exact {exact:.3f} mean estimate {estimates.mean():.3f} stderr {stderr:.3f}")
    assert abs(float(estimates.mean()) - exact) < 4 * stderr
    # and a single draw is not exact at r < n (the test above is not vacuous)
    assert estimates.std() > 0.01 * abs(exact)


def test_draws_are_seeded_and_differ_by_layer():
    a = sketch_draws(64, 32, seed=1, layer_idx=2)
    b = sketch_draws(64, 32, seed=1, layer_idx=2)
    c = sketch_draws(64, 32, seed=1, layer_idx=3)
    assert torch.equal(a.signs, b.signs) and torch.equal(a.coords, b.coords)
    assert not (torch.equal(a.signs, c.signs) and torch.equal(a.coords, c.coords))
    assert len(set(a.coords.tolist())) == a.r == 32


def _fwht_unnormalised(x):
    """Walsh-Hadamard transform by the butterfly, no scaling (an independent check)."""
    x = x.clone()
    n = x.shape[-1]
    h = 1
    while h < n:
        x = x.view(*x.shape[:-1], n // (2 * h), 2, h)
        a, b = x[..., 0, :].clone(), x[..., 1, :].clone()
        x = torch.stack([a + b, a - b], dim=-2).view(*x.shape[:-3], n)
        h *= 2
    return x


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("parity", [False, True])
@pytest.mark.parametrize("hq, hkv", [(4, 4), (6, 2), (8, 1)])
def test_block_logits_brute_force(exact, parity, hq, hkv):
    d, nb, r = 64, 5, 32
    gen = torch.Generator().manual_seed(11)
    qb = torch.randn(2, hq, nb, d, generator=gen)
    kb = torch.randn(2, hkv, nb, d, generator=gen)
    cfg = SketchWalkConfig(sketch_dim=r, exact=exact, parity=parity, temperature=0.7, seed=4)
    got = block_logits(qb, kb, cfg, layer_idx=9)
    draws = sketch_draws(d, r, seed=4, layer_idx=9)
    want = torch.empty_like(got)
    for b in range(2):
        for h in range(hq):
            qv, kv = qb[b, h], kb[b, h // (hq // hkv)]
            if exact:
                s = qv @ kv.T
                want[b, h] = (
                    (s / math.sqrt(d)).clamp(-10, 10) if parity else s / (math.sqrt(d) * 0.7)
                )
                continue
            qt = _fwht_unnormalised(qv * draws.signs)[:, draws.coords]
            kt = _fwht_unnormalised(kv * draws.signs)[:, draws.coords]
            if parity:
                qt, kt = qt / math.sqrt(d / r), kt / math.sqrt(d / r)
                want[b, h] = (qt @ kt.T) / math.sqrt(r) / 100
            else:
                qt, kt = qt / math.sqrt(r), kt / math.sqrt(r)
                want[b, h] = (qt @ kt.T) / (math.sqrt(d) * 0.7)
    err = (got - want).abs().max()
    print(f"max abs error {err:.2e}")
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_default_temperature_reproduces_released_scale_at_d128():
    d = 128
    gen = torch.Generator().manual_seed(0)
    qb, kb = torch.randn(1, 2, 3, d, generator=gen), torch.randn(1, 2, 3, d, generator=gen)
    ours = block_logits(qb, kb, SketchWalkConfig(), layer_idx=2)
    released = block_logits(qb, kb, SketchWalkConfig(parity=True), layer_idx=2)
    torch.testing.assert_close(ours, released, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(
        ours, (qb @ kb.transpose(-1, -2)) * math.sqrt(128) / 100, atol=1e-4, rtol=1e-4
    )
