"""Per-page state in a paged cache's page padding (`sketchwalk.engines.page_tail`): the views
land after each page and nowhere else, and the page bounds and query sums kept there evolve as
their own allocations do."""

from __future__ import annotations

import pytest
import torch

from sketchwalk.engines.page_tail import PageTailLayout
from sketchwalk.selection.paged_queries import PageQuerySums
from sketchwalk.selection.paged_quest import PageKeyBounds


def _padded_cache(num_pages, hkv, page_size, d, dtype, tail_bytes, layout="LBHNC"):
    """A (pages, Hkv, page_size, 2D) view over a flat buffer whose pages are ``tail_bytes``
    longer than the keys and values (what vLLM makes of a spec with ``page_size_padded``);
    ``LBNHC`` stores each page as (page_size, Hkv, 2D). Returns (view, buffer)."""
    size = torch.empty((), dtype=dtype).element_size()
    page = hkv * page_size * 2 * d
    stride0 = page + tail_bytes // size
    raw = torch.zeros(num_pages * stride0, dtype=dtype)
    if layout == "LBHNC":
        strides = (stride0, page_size * 2 * d, 2 * d, 1)
    else:
        strides = (stride0, 2 * d, hkv * 2 * d, 1)
    return torch.as_strided(raw, (num_pages, hkv, page_size, 2 * d), strides), raw


@pytest.mark.parametrize("layout", ["LBHNC", "LBNHC"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_views_fill_the_padding_and_nothing_else(layout, dtype):
    tail = PageTailLayout(num_kv_heads=2, head_dim=16, dtype=dtype, num_heads=8)
    cache, raw = _padded_cache(5, 2, 8, 16, dtype, tail.nbytes, layout)
    views = tail.views(cache)
    assert views is not None and views.sums is not None
    assert tuple(views.key_min.shape) == (5, 2, 16) and views.key_min.dtype == dtype
    assert tuple(views.sums.shape) == (5, 8, 16) and tuple(views.valid.shape) == (5,)
    for t in (views.key_min, views.key_max, views.sums, views.valid):
        t.fill_(7.0)
    assert bool((cache == 0).all())  # the keys and values are untouched
    written = raw.view(torch.uint8).view(5, -1)[:, cache[0].numel() * raw.element_size() :]
    used = tail.bounds_bytes + tail.sums_bytes
    print(f"tail bytes {tail.nbytes}, used {used}")
    bounds = written[:, : tail.bounds_bytes].contiguous().view(dtype)
    sums = written[:, tail.bounds_bytes : used].contiguous().view(torch.float32)
    assert bool((bounds == 7).all()) and bool((sums == 7).all())
    assert bool((written[:, used:] == 0).all())


def test_layout_bytes():
    bf16 = PageTailLayout(num_kv_heads=8, head_dim=128, dtype=torch.bfloat16)
    assert bf16.nbytes == 2 * 8 * 128 * 2
    with_sums = PageTailLayout(num_kv_heads=8, head_dim=128, dtype=torch.bfloat16, num_heads=32)
    assert with_sums.nbytes == 2 * 8 * 128 * 2 + 32 * 128 * 4 + 16  # the flag, 16-aligned
    with pytest.raises(ValueError, match="num_kv_heads"):
        PageTailLayout(num_kv_heads=0, head_dim=128, dtype=torch.bfloat16)


def test_no_views_without_room():
    tail = PageTailLayout(num_kv_heads=2, head_dim=16, dtype=torch.float32, num_heads=4)
    dense = torch.zeros(4, 2, 8, 32)
    assert tail.views(dense) is None  # no padding
    bounds_only, _ = _padded_cache(4, 2, 8, 16, torch.float32, tail.without_sums().nbytes)
    views = tail.views(bounds_only)
    assert views is not None and views.sums is None and views.valid is None
    too_small, _ = _padded_cache(4, 2, 8, 16, torch.float32, tail.without_sums().nbytes - 16)
    assert tail.views(too_small) is None
    assert tail.views(bounds_only.to(torch.bfloat16)) is None  # another dtype


def test_state_in_the_padding_evolves_like_its_own_allocation():
    """Steps of writes (a page restarted, pages filled over several steps, padded slots) give
    the same bounds and sums whether they live in the padding or in their own tensors; padded
    slots land on page 0 (the engine's null block) in the padding."""
    g = torch.Generator().manual_seed(0)
    hq, hkv, d, page, pages = 4, 2, 16, 8, 6
    tail = PageTailLayout(hkv, d, torch.float32, hq)
    cache, _ = _padded_cache(pages, hkv, page, d, torch.float32, tail.nbytes)
    cache.copy_(torch.randn(cache.shape, generator=g))
    k_pages = cache[..., :d].transpose(1, 2)
    views = tail.views(cache)
    inside = PageKeyBounds(k_pages, (views.key_min, views.key_max), scratch=0)
    outside = PageKeyBounds(k_pages)
    sums_in = PageQuerySums(pages, page, hq, d, "cpu", (views.sums, views.valid), scratch=0)
    sums_out = PageQuerySums(pages, page, hq, d, "cpu")
    steps = [
        torch.tensor([8, 9, 10, 24, -1]),  # pages 1 and 3 restart; a padded slot
        torch.tensor([11, 12, 25, -1, -1]),
        torch.tensor([8, 40, 41, 26, 13]),  # page 1 restarts again (a new owner)
    ]
    for slots in steps:
        keys = torch.randn(len(slots), hkv, d, generator=g)
        queries = torch.randn(len(slots), hq, d, generator=g)
        for b in (inside, outside):
            b.update(keys, slots)
        for s in (sums_in, sums_out):
            s.update(queries, slots)
    real = slice(1, pages)  # page 0 is the scratch page of the views
    torch.testing.assert_close(inside.key_min[real], outside.key_min[real], atol=0, rtol=0)
    torch.testing.assert_close(inside.key_max[real], outside.key_max[real], atol=0, rtol=0)
    torch.testing.assert_close(sums_in.sums[real], sums_out.sums[real], atol=0, rtol=0)
    table = torch.tensor([1, 3, 5])
    pooled_in, ok_in = sums_in.pooled(table, 20, page)
    pooled_out, ok_out = sums_out.pooled(table, 20, page)
    torch.testing.assert_close(pooled_in, pooled_out)
    assert bool(ok_in) and bool(ok_out)
    assert not bool(sums_in.pooled(torch.tensor([1, 2]), 12, page)[1])  # page 2 never restarted
    with pytest.raises(ValueError, match="storage key_min"):
        PageKeyBounds(k_pages, (views.key_min[:, :1], views.key_max))
    with pytest.raises(ValueError, match="scratch"):
        PageKeyBounds(k_pages, (views.key_min, views.key_max), scratch=pages)
