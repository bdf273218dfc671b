"""`top_k_compact` (Triton; the CPU interpreter without CUDA) against its PyTorch definition, and
the definition against `torch.topk`."""

from __future__ import annotations

import pytest
import torch

from sketchwalk.selection.topk import top_k_compact, top_k_compact_reference

# the kernel runs on the GPU where there is one, else under the Triton CPU interpreter
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _rows(n_rows, n, seed, ties=False):
    g = torch.Generator().manual_seed(seed)
    if ties:  # few distinct values: many ties at the threshold
        x = torch.randint(-3, 4, (n_rows, n), generator=g).float()
    else:
        x = torch.randn(n_rows, n, generator=g) * 5
    if n >= 6:
        x[:, 0] = float("inf")  # forced
        x[:, -2:] = float("-inf")  # excluded (past the cache)
        x[0, 3] = -0.0
        x[0, 4] = 0.0
    return x


def _check(idx, num, ref_idx, ref_num):
    assert torch.equal(num, ref_num)
    for r in range(num.numel()):
        c = int(num.view(-1)[r])
        assert torch.equal(idx.view(-1, idx.shape[-1])[r, :c],
                           ref_idx.view(-1, idx.shape[-1])[r, :c]), f"row {r}"  # fmt: skip


@pytest.mark.parametrize(
    ("n", "ties"), [(1, False), (7, False), (100, True), (1500, False), (1500, True), (5000, True)]
)
def test_kernel_equals_reference(n, ties):
    x = _rows(5, n, seed=n, ties=ties)
    ks = torch.tensor([0, 1, n // 3, n, n + 4], dtype=torch.int64)  # per row; clamped to [0, n]
    idx, num = top_k_compact(x.to(DEVICE), ks.to(DEVICE), backend="triton")
    idx, num = idx.cpu(), num.cpu()
    ref_idx, ref_num = top_k_compact_reference(x, ks)
    assert idx.dtype == num.dtype == torch.int32
    assert ref_num.tolist() == [min(max(int(k), 0), n) for k in ks]
    _check(idx, num, ref_idx, ref_num)


def test_one_k_for_all_rows_and_batched_shape():
    x = _rows(6, 300, seed=3).view(2, 3, 300)
    k = torch.tensor([40])
    idx, num = top_k_compact(x.to(DEVICE), k.to(DEVICE), backend="triton")
    idx, num = idx.cpu(), num.cpu()
    ref_idx, ref_num = top_k_compact_reference(x, k)
    assert idx.shape == (2, 3, 300) and num.shape == (2, 3)
    assert (num == 40).all()
    _check(idx, num, ref_idx, ref_num)


def test_reference_is_the_top_k_set_in_ascending_order():
    x = torch.randn(4, 200, generator=torch.Generator().manual_seed(1))  # distinct values
    idx, num = top_k_compact_reference(x, torch.tensor([17]))
    want = x.topk(17, dim=-1).indices.sort(-1).values
    assert torch.equal(idx[:, :17].long(), want)
    assert (num == 17).all()
    # ties go to the lower index
    tied = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0]])
    idx, _ = top_k_compact_reference(tied, torch.tensor([2]))
    assert idx[0, :2].tolist() == [1, 2]


def test_errors():
    x = torch.randn(2, 8)
    with pytest.raises(TypeError, match="float32"):
        top_k_compact(x.double(), torch.tensor([1]))
    with pytest.raises(ValueError, match="integer tensor"):
        top_k_compact(x, torch.tensor([1.0]))
    with pytest.raises(ValueError, match="one per row"):
        top_k_compact(x, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="unknown backend"):
        top_k_compact(x, torch.tensor([1]), backend="cuda")


def test_auto_checks_the_kernel_once_per_device_and_falls_back(monkeypatch):
    """``backend="auto"`` trusts the kernel on a device only after it matched the reference
    there; a kernel that fails or disagrees gives way to the reference, with a warning."""
    from sketchwalk.selection import topk, triton_topk

    monkeypatch.setattr(topk, "_VERIFIED", {})
    assert topk.kernel_verified(DEVICE)  # the real kernel (the interpreter without CUDA)
    assert topk._VERIFIED[str(torch.device(DEVICE))] is True

    def broken(flat, ks):
        raise RuntimeError("no such instruction")

    def wrong(flat, ks):
        idx, num = real(flat, ks)
        return idx.flip(-1), num

    real = triton_topk.launch_top_k_compact
    for fake, message in ((broken, "fails"), (wrong, "another result")):
        monkeypatch.setattr(topk, "_VERIFIED", {})
        monkeypatch.setattr(triton_topk, "launch_top_k_compact", fake)
        with pytest.warns(RuntimeWarning, match=message):
            assert not topk.kernel_verified("cpu")
        assert not topk.kernel_verified("cpu")  # remembered: no second warning
