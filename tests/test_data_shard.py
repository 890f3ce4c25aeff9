"""Sharded batches for data-parallel training: BatchLoader(shard=...) and the split transforms."""

from __future__ import annotations

import pytest
import torch

from adarts_kernels.data import BatchLoader, ImageSet, cutout, normalize, random_crop_flip
from adarts_kernels.data.transforms import (
    apply_crop_flip,
    apply_cutout,
    crop_flip_params,
    cutout_params,
)


def _toy_set(n: int, h: int = 6, w: int = 5, channels_last: bool = False) -> ImageSet:
    g = torch.Generator().manual_seed(100 + n)
    images = torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=g)
    if channels_last:  # a non-contiguous (N, C, H, W) view of an (N, H, W, C) buffer
        images = images.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
        assert not images.is_contiguous()
    labels = torch.arange(n, dtype=torch.int64) * 7 % 11  # not sorted, repeats
    return ImageSet(images, labels, 11, (0.45, 0.5, 0.55), (0.2, 0.25, 0.3), "toy")


def _batches(loader: BatchLoader, epoch: int):
    loader.set_epoch(epoch)
    return [(x.clone(), y.clone()) for x, y in loader]


# --------------------------------------------------------------------------- split transforms


def test_crop_flip_params_and_apply_equal_random_crop_flip_on_any_slice():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(17, 3, 7, 9, generator=g).transpose(2, 3)  # non-contiguous (17, 3, 9, 7)
    pad = 3
    whole = random_crop_flip(x, pad, torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)
    dy, dx, flip = crop_flip_params(17, pad, gen)
    # the documented draws, in this order
    g2 = torch.Generator().manual_seed(5)
    assert torch.equal(dy, torch.randint(0, 2 * pad + 1, (17,), generator=g2))
    assert torch.equal(dx, torch.randint(0, 2 * pad + 1, (17,), generator=g2))
    assert torch.equal(flip, torch.rand(17, generator=g2) < 0.5)
    assert torch.equal(gen.get_state(), g2.get_state())
    assert dy.shape == dx.shape == flip.shape == (17,) and flip.dtype == torch.bool
    assert torch.equal(apply_crop_flip(x, dy, dx, flip, pad), whole)
    for lo, hi in [(0, 5), (5, 6), (6, 17), (4, 4)]:
        part = apply_crop_flip(x[lo:hi], dy[lo:hi], dx[lo:hi], flip[lo:hi], pad)
        assert part.shape == (hi - lo, 3, 9, 7)
        assert torch.equal(part, whole[lo:hi])
    # by hand for one flipped and one unflipped sample
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    for i in (int(flip.nonzero()[0]), int((~flip).nonzero()[0])):
        crop = padded[i, :, int(dy[i]):int(dy[i]) + 9, int(dx[i]):int(dx[i]) + 7]
        assert torch.equal(whole[i], crop.flip(-1) if flip[i] else crop)


def test_cutout_params_and_apply_equal_cutout_on_any_slice():
    x = torch.rand(40, 2, 8, 5, generator=torch.Generator().manual_seed(1)) + 0.5
    x = x.transpose(2, 3).contiguous().transpose(2, 3)  # non-contiguous strides
    assert not x.is_contiguous()
    length = 3
    whole = cutout(x, length, torch.Generator().manual_seed(2))
    gen = torch.Generator().manual_seed(2)
    cy, cx = cutout_params(40, 8, 5, gen)
    g2 = torch.Generator().manual_seed(2)
    assert torch.equal(cy, torch.randint(0, 8, (40,), generator=g2))
    assert torch.equal(cx, torch.randint(0, 5, (40,), generator=g2))
    assert torch.equal(gen.get_state(), g2.get_state())
    assert torch.equal(apply_cutout(x, length, cy, cx), whole)
    for lo, hi in [(0, 13), (13, 40), (7, 7)]:
        assert torch.equal(apply_cutout(x[lo:hi], length, cy[lo:hi], cx[lo:hi]), whole[lo:hi])
    zeroed = (whole == 0).all(1)
    assert 0 < zeroed.sum() <= 40 * length * length
    # length 0: a copy, and cutout draws nothing
    gen0 = torch.Generator().manual_seed(3)
    state = gen0.get_state()
    assert torch.equal(cutout(x, 0, gen0), x)
    assert torch.equal(gen0.get_state(), state)
    assert torch.equal(apply_cutout(x, 0, cy, cx), x)


def test_split_transforms_refuse_bad_parameters():
    x = torch.zeros(4, 3, 5, 5)
    dy, dx, flip = crop_flip_params(4, 2, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="dy must be a 1-D tensor"):
        apply_crop_flip(x, dy[:3], dx, flip, 2)
    with pytest.raises(ValueError, match="flip must be a bool"):
        apply_crop_flip(x, dy, dx, flip.long(), 2)
    with pytest.raises(ValueError, match="dx must be an integer"):
        apply_crop_flip(x, dy, dx.float(), flip, 2)
    with pytest.raises(ValueError, match=r"dy must lie in \[0, 4\]"):
        apply_crop_flip(x, dy + 5, dx, flip, 2)
    with pytest.raises(ValueError, match=r"dx must lie in \[0, 4\]"):
        apply_crop_flip(x, dy, dx - 5, flip, 2)
    with pytest.raises(ValueError, match="pad must be >= 0"):
        crop_flip_params(4, -1, torch.Generator())
    with pytest.raises(ValueError, match="b must be >= 0"):
        cutout_params(-1, 5, 5, torch.Generator())
    with pytest.raises(ValueError, match="h and w"):
        cutout_params(2, 0, 5, torch.Generator())
    cy, cx = cutout_params(4, 5, 5, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="cx must be a 1-D tensor"):
        apply_cutout(x, 2, cy, cx[None])
    with pytest.raises(ValueError, match="4-D"):
        apply_cutout(x[0], 2, cy, cx)


# --------------------------------------------------------------------------- the sharded loader

# (data set size, global batch size, drop_last): no size divides its batch; (23, 5) ends on
# a batch of 3 and (3, 8) is one batch of 3, so W = 4, 5 get empty slices; (10, 4) ends on 2.
DATASETS = [(23, 5, False), (10, 4, False), (3, 8, False), (23, 5, True), (11, 3, False)]
# (shuffle, augment, cutout)
MODES = [(False, False, 0), (True, True, 3), (True, False, 2), (False, True, 0)]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("n,batch_size,drop_last", DATASETS)
@pytest.mark.parametrize("shuffle,augment,cut", MODES)
def test_rank_batches_concatenate_to_the_unsharded_batch(world_size, n, batch_size, drop_last,
                                                         shuffle, augment, cut):
    ds = _toy_set(n, channels_last=(n == 11))
    kw = dict(shuffle=shuffle, augment=augment, cutout=cut, pad=2, drop_last=drop_last, seed=3)
    full = BatchLoader(ds, batch_size, **kw)
    ranks = [BatchLoader(ds, batch_size, shard=(r, world_size), **kw) for r in range(world_size)]
    assert all(len(r) == len(full) for r in ranks)
    saw_empty = False
    for epoch in (0, 1):
        want = _batches(full, epoch)
        got = [_batches(r, epoch) for r in ranks]
        assert len(want) == len(full) and all(len(g) == len(want) for g in got)
        for i, (wx, wy) in enumerate(want):
            assert full.global_batch_size(i) == len(wy)
            parts = torch.arange(len(wy)).tensor_split(world_size)
            for r, loader in enumerate(ranks):
                x, y = got[r][i]
                lo, hi = loader.shard_bounds(i)
                assert loader.global_batch_size(i) == len(wy)
                assert (lo, hi) == ((int(parts[r][0]), int(parts[r][-1]) + 1) if len(parts[r])
                                    else (lo, lo))
                assert x.shape == (hi - lo, 3, 6, 5) and y.shape == (hi - lo,)
                assert x.dtype == torch.float32 and y.dtype == torch.int64
                saw_empty |= hi == lo
            xs = torch.cat([got[r][i][0] for r in range(world_size)])
            ys = torch.cat([got[r][i][1] for r in range(world_size)])
            assert torch.equal(xs, wx) and torch.equal(ys, wy)
        # shard bounds of consecutive ranks tile each global batch
        for i in range(len(full)):
            bounds = [r.shard_bounds(i) for r in ranks]
            assert bounds[0][0] == 0 and bounds[-1][1] == full.global_batch_size(i)
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    last = full.global_batch_size(len(full) - 1)
    assert saw_empty == (last < world_size)


@pytest.mark.parametrize("shuffle,augment,cut", MODES)
def test_unsharded_loader_is_the_draws_of_the_whole_batch(shuffle, augment, cut):
    """shard=(0, 1) is the loader as it always was: per epoch one generator, the order
    first, then per batch random_crop_flip then cutout on the whole batch."""
    ds = _toy_set(23)
    seed, pad, bs = 5, 2, 5
    default = BatchLoader(ds, bs, shuffle=shuffle, augment=augment, cutout=cut, pad=pad, seed=seed)
    explicit = BatchLoader(ds, bs, shuffle=shuffle, augment=augment, cutout=cut, pad=pad,
                           seed=seed, shard=(0, 1))
    assert default.shard == explicit.shard == (0, 1)
    for epoch in (0, 1):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(23, generator=gen) if shuffle else torch.arange(23)
        expect = []
        for start in range(0, 23, bs):
            idx = order[start:start + bs]
            images = ds.images[idx]
            if augment:
                images = random_crop_flip(images, pad, gen)
            x = normalize(images, ds.mean, ds.std)
            if cut:
                x = cutout(x, cut, gen)
            expect.append((x, ds.labels[idx]))
        for got in (_batches(default, epoch), _batches(explicit, epoch)):
            assert len(got) == len(expect) == 5
            for (x, y), (ex, ey) in zip(got, expect):
                assert torch.equal(x, ex) and torch.equal(y, ey)


def test_bad_shards_are_refused():
    ds = _toy_set(7)
    bad = [(2, 2), (-1, 2), (0, 0), (3, -1), (1.0, 2), (0, 2.0), (True, 2), (0,), (0, 1, 2),
           None, "01", 3]
    for shard in bad:
        with pytest.raises(ValueError, match="BatchLoader: shard"):
            BatchLoader(ds, 2, shuffle=False, augment=False, shard=shard)
    with pytest.raises(ValueError, match=r"0 <= rank < world_size=2, got 2"):
        BatchLoader(ds, 2, shuffle=False, augment=False, shard=(2, 2))
    ok = BatchLoader(ds, 2, shuffle=False, augment=False, shard=[torch.tensor(1).item(), 3])
    assert ok.shard == (1, 3)


def test_global_batch_size_and_shard_bounds_ranges_and_repr():
    ds = _toy_set(10)
    loader = BatchLoader(ds, 4, shuffle=True, augment=True, shard=(2, 3))
    assert [loader.global_batch_size(i) for i in range(len(loader))] == [4, 4, 2]
    assert [loader.shard_bounds(i) for i in range(len(loader))] == [(3, 4), (3, 4), (2, 2)]
    for i in (-1, 3):
        with pytest.raises(IndexError, match="out of range"):
            loader.global_batch_size(i)
        with pytest.raises(IndexError, match="out of range"):
            loader.shard_bounds(i)
    assert "shard=(2, 3)" in repr(loader)
    assert "shard" not in repr(BatchLoader(ds, 4, shuffle=True, augment=True))
