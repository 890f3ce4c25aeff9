"""Tests for the ImageNet pipeline: adarts_kernels.data.imagenet, imagenet_folder and jpeg.

Every test writes real image files with Pillow into a temporary ImageFolder.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from jpeg_helpers import smooth_image
from PIL import Image

from adarts_kernels.data import DataError
from adarts_kernels.data import imagenet as inet
from adarts_kernels.data import jpeg
from adarts_kernels.data.imagenet import (
    ImageFolder,
    ImageNetDataset,
    ImageNetLoader,
    ShardedBatchSampler,
    load_manifest,
    make_full_manifest,
    make_search_manifest,
    save_manifest,
    scan_image_folder,
)

CLASSES = ["cat", "dog", "fox"]
TRAIN_PER_CLASS = 8


def write_folder(root: Path) -> None:
    sizes = [(500, 375), (40, 30), (375, 500), (320, 240), (256, 300), (64, 48), (200, 180), (90, 120)]
    for split, count in (("train", TRAIN_PER_CLASS), ("val", 2)):
        for k, name in enumerate(CLASSES):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(count):
                w, h = sizes[(i + k) % len(sizes)]
                ext = ".JPEG" if i % 3 else ".jpg"
                smooth_image(w, h, seed=100 * k + i + (0 if split == "train" else 50)).save(
                    d / f"{name}_{i:03d}{ext}", quality=90)
    cat = root / "train" / "cat"
    smooth_image(120, 90, 7, "L").save(cat / "grey.JPEG", quality=90)
    smooth_image(120, 90, 8, "CMYK").save(cat / "cmyk.JPEG", quality=90)
    rgba = smooth_image(80, 60, 9).convert("RGBA")
    rgba.putalpha(128)
    rgba.save(cat / "png_in_jpeg.JPEG", format="PNG")
    smooth_image(60, 40, 10).convert("P").save(cat / "palette.png")
    (cat / "notes.txt").write_text("not an image")


@pytest.fixture(scope="module")
def folder_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imagenet")
    write_folder(root)
    return root


@pytest.fixture(scope="module")
def folder(folder_root) -> ImageFolder:
    return scan_image_folder(folder_root)


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# --------------------------------------------------------------------------- scan


def test_scan_classes_labels(folder, folder_root):
    assert folder.classes == CLASSES
    assert len(folder.train) == 3 * TRAIN_PER_CLASS + 4  # grey, cmyk, png-in-jpeg, palette
    assert len(folder.val) == 3 * 2
    for rel, label in folder.train + folder.val:
        assert rel.split("/")[1] == CLASSES[label]
        assert (folder_root / rel).is_file()
    names = [p for p, _ in folder.train]
    assert "train/cat/palette.png" in names and "train/cat/cat_000.jpg" in names
    assert not any(p.endswith(".txt") for p in names)
    assert names == sorted(names)


def _refusal_cases():
    def no_val(r):
        shutil.rmtree(r / "val")

    def no_train(r):
        shutil.rmtree(r / "train")

    def empty_class(r):
        for f in (r / "val" / "dog").iterdir():
            f.unlink()

    def different(r):
        (r / "val" / "fox").rename(r / "val" / "wolf")

    def no_images(r):
        for d in ("train", "val"):
            shutil.rmtree(r / d)
            (r / d).mkdir()

    return [(no_val, "val"), (no_train, "train"), (empty_class, os.path.join("val", "dog")),
            (different, "wolf"), (no_images, "no class folders")]


@pytest.mark.parametrize("damage,expected", _refusal_cases(), ids=lambda v: getattr(v, "__name__", ""))
def test_scan_refusals(tmp_path, folder_root, damage, expected):
    root = tmp_path / "copy"
    shutil.copytree(folder_root, root)
    damage(root)
    with pytest.raises(DataError) as e:
        scan_image_folder(root)
    msg = one_line(e)
    assert expected in msg and str(root) in msg


def test_scan_differing_classes_names_both_sides(tmp_path, folder_root):
    root = tmp_path / "copy"
    shutil.copytree(folder_root, root)
    (root / "val" / "fox").rename(root / "val" / "wolf")
    with pytest.raises(DataError, match=r"only in train: fox; only in val: wolf"):
        scan_image_folder(root)


# --------------------------------------------------------------------------- manifests


def test_search_manifest_deterministic_per_class_disjoint(folder):
    m1 = make_search_manifest(folder, train_fraction=0.5, arch_fraction=0.25, seed=3)
    m2 = make_search_manifest(folder, train_fraction=0.5, arch_fraction=0.25, seed=3)
    m3 = make_search_manifest(folder, train_fraction=0.5, arch_fraction=0.25, seed=4)
    assert m1.splits == m2.splits
    assert m1.splits != m3.splits
    train, arch = m1.splits["train"], m1.splits["arch"]
    assert not set(train) & set(arch)
    counts = {k: sum(1 for p, _ in folder.train if _ == k) for k in range(3)}
    for k in range(3):
        assert sum(1 for _, l in train if l == k) == int(np.floor(0.5 * counts[k] + 0.5))
        assert sum(1 for _, l in arch if l == k) == int(np.floor(0.25 * counts[k] + 0.5))
    assert set(train) <= set(folder.train) and set(arch) <= set(folder.train)
    # the draw ignores the listing order
    shuffled = list(folder.train)
    random.Random(0).shuffle(shuffled)
    m4 = make_search_manifest(ImageFolder(folder.root, folder.classes, shuffled, folder.val), 0.5, 0.25, 3)
    assert m4.splits == m1.splits
    assert m1.settings == {"kind": "search", "train_fraction": 0.5, "arch_fraction": 0.25, "seed": 3}


def test_search_manifest_refuses_too_small_fraction(folder):
    with pytest.raises(DataError) as e:
        make_search_manifest(folder, train_fraction=0.1, arch_fraction=0.025, seed=0)
    msg = one_line(e)
    # "cat" has 12 images (8 + 4 special ones): 0.025 * 12 rounds to 0; one image needs 20
    assert "'cat'" in msg and "arch_fraction=0.025" in msg and "at least 20 images" in msg
    with pytest.raises(ValueError):
        make_search_manifest(folder, train_fraction=0.8, arch_fraction=0.3)


def test_manifest_json_round_trip_and_mismatch(tmp_path, folder_root):
    root = tmp_path / "copy"
    shutil.copytree(folder_root, root)
    folder = scan_image_folder(root)
    m = make_search_manifest(folder, 0.5, 0.25, seed=1)
    path = tmp_path / "run" / "manifest.json"
    save_manifest(m, path)
    assert sorted(os.listdir(path.parent)) == ["manifest.json"]  # no temporary file left behind
    d = json.loads(path.read_text())
    assert d["class_hash"] == m.class_hash and d["settings"]["seed"] == 1
    back = load_manifest(path, root=root)
    assert back.splits == m.splits and back.classes == m.classes and back.settings == m.settings
    full = make_full_manifest(folder)
    save_manifest(full, tmp_path / "full.json")
    assert load_manifest(tmp_path / "full.json", root).splits == full.splits
    # a listed file disappears
    victim = root / m.splits["arch"][0][0]
    victim.unlink()
    with pytest.raises(DataError) as e:
        load_manifest(path, root=root)
    assert str(victim) in one_line(e) and "missing" in str(e.value)
    # different classes
    (root / "train" / "fox").rename(root / "train" / "wolf")
    with pytest.raises(DataError) as e:
        load_manifest(path, root=root)
    msg = one_line(e)
    assert "only in the manifest: fox" in msg and "only in the folder: wolf" in msg
    # not a manifest
    (tmp_path / "bad.json").write_text('{"format": "something else"}')
    with pytest.raises(DataError, match="bad.json"):
        load_manifest(tmp_path / "bad.json")


# --------------------------------------------------------------------------- transforms


def test_transforms_shapes_all_formats(folder, folder_root):
    for rel, _ in folder.train:
        for size in (32, 64):
            x, _ = jpeg.load_train_image(folder_root / rel, size, jpeg.sample_rng(0, 0, 1))
            assert x.shape == (3, size, size) and x.dtype == torch.uint8 and x.is_contiguous()
            v, _ = jpeg.load_val_image(folder_root / rel, size)
            assert v.shape == (3, size, size) and v.dtype == torch.uint8
    # greyscale becomes three equal channels
    g, _ = jpeg.load_val_image(folder_root / "train/cat/grey.JPEG", 32)
    assert torch.equal(g[0], g[1]) and torch.equal(g[1], g[2])


def test_train_transform_is_pure_function_of_seed_epoch_index(folder_root):
    path = folder_root / "train/dog/dog_000.jpg"
    a, _ = jpeg.load_train_image(path, 32, jpeg.sample_rng(5, 2, 7))
    b, _ = jpeg.load_train_image(path, 32, jpeg.sample_rng(5, 2, 7))
    assert torch.equal(a, b)
    others = [jpeg.load_train_image(path, 32, jpeg.sample_rng(5, e, 7))[0] for e in (3, 4, 5)]
    assert all(not torch.equal(a, o) for o in others)


def test_crop_and_flip_follow_the_draws(folder_root):
    path = folder_root / "train/fox/fox_001.JPEG"
    w, h = Image.open(path).size
    flips = set()
    for i in range(8):
        rng = jpeg.sample_rng(0, 0, i)
        top, left, ch, cw = jpeg.random_resized_crop_params(w, h, rng)
        assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w
        assert 0.08 * w * h * 0.9 <= ch * cw <= w * h
        flip = rng.random() < 0.5
        flips.add(flip)
        with Image.open(path) as img:
            want, _ = jpeg.decode_crop_resize(img, (left, top, left + cw, top + ch), 32)
        if flip:
            want = want.flip(-1)
        got, _ = jpeg.load_train_image(path, 32, jpeg.sample_rng(0, 0, i))
        assert torch.equal(got, want)
    assert flips == {True, False}


def test_random_resized_crop_center_fallback():
    rng = np.random.default_rng(0)
    # an impossible area range forces the fallback: the whole image cut to ratio 4/3, centred
    assert jpeg.random_resized_crop_params(400, 100, rng, scale=(2.0, 3.0)) == (0, 133, 100, 133)
    assert jpeg.random_resized_crop_params(120, 100, rng, scale=(2.0, 3.0)) == (0, 0, 100, 120)


def test_draft_mode_reduces_decode_and_matches_full_decode(folder_root):
    path = folder_root / "train/cat/cat_000.jpg"  # 500 x 375
    assert Image.open(path).size == (500, 375)
    box = jpeg.center_crop_box(500, 375, 32)
    assert jpeg.draft_scale(box, 32) == 8
    assert jpeg.draft_scale((0, 0, 100, 100), 64) == 1 and jpeg.draft_scale((0, 0, 300, 260), 64) == 4
    with Image.open(path) as img:
        img.draft("RGB", (500 // 8, 375 // 8))
        img.load()
        assert img.size == (63, 47)  # decoded at 1/8 in the DCT domain
    fast, s_fast = jpeg.load_val_image(path, 32, use_draft=True)
    full, s_full = jpeg.load_val_image(path, 32, use_draft=False)
    assert (s_fast, s_full) == (8, 1)
    diff = (fast.int() - full.int()).abs().float()
    assert diff.mean() < 2.5 and diff.max() < 16  # measured 1.7 and 8 (1/8 DCT scaling vs full decode)
    # the training crop: draft where the crop stays >= size after reduction, same pixels within tolerance
    scales = []
    for i in range(6):
        a, s = jpeg.load_train_image(path, 32, jpeg.sample_rng(0, 0, i), resize="pil")
        b, _ = jpeg.load_train_image(path, 32, jpeg.sample_rng(0, 0, i), resize="pil", use_draft=False)
        scales.append(s)
        assert (a.int() - b.int()).abs().float().mean() < 2.5  # measured <= 1.9
    assert max(scales) > 1
    # the default torch resize: exact without draft, Pillow's sub-pixel resize within a grey level
    pil, _ = jpeg.load_val_image(path, 32, use_draft=False, resize="pil")
    assert (pil.int() - full.int()).abs().float().mean() < 1.0


def test_color_jitter_uint8_deterministic(folder_root):
    path = folder_root / "train/dog/dog_002.JPEG"
    a, _ = jpeg.load_train_image(path, 32, jpeg.sample_rng(1, 0, 0), jitter=True)
    b, _ = jpeg.load_train_image(path, 32, jpeg.sample_rng(1, 0, 0), jitter=True)
    plain, _ = jpeg.load_train_image(path, 32, jpeg.sample_rng(1, 0, 0))
    assert a.dtype == torch.uint8 and a.shape == (3, 32, 32)
    assert torch.equal(a, b) and not torch.equal(a, plain)


# --------------------------------------------------------------------------- bad files


def _bad_files(root: Path, folder_root: Path):
    d = root / "train" / "cat"
    d.mkdir(parents=True)
    good = (folder_root / "train/cat/cat_001.JPEG").read_bytes()
    (d / "a.JPEG").write_bytes(good)
    (d / "b_truncated.JPEG").write_bytes(good[: len(good) // 2])
    (d / "c_garbage.JPEG").write_bytes(b"\x00not a jpeg" * 50)
    (d / "d.JPEG").write_bytes(good)
    return [("train/cat/a.JPEG", 0), ("train/cat/b_truncated.JPEG", 0),
            ("train/cat/c_garbage.JPEG", 1), ("train/cat/d.JPEG", 2)]


@pytest.mark.parametrize("train", [True, False])
def test_corrupt_file_raises_naming_it(tmp_path, folder_root, train):
    samples = _bad_files(tmp_path, folder_root)
    ds = ImageNetDataset(tmp_path, samples, train=train, size=32)
    for i in (1, 2):
        with pytest.raises(DataError) as e:
            ds[i]
        assert str(tmp_path / samples[i][0]) in one_line(e)


def test_skip_bad_images_replaces_and_counts(tmp_path, folder_root):
    samples = _bad_files(tmp_path, folder_root)
    ds = ImageNetDataset(tmp_path, samples, train=True, size=32, skip_bad_images=True)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        x1, l1 = ds[(0, 1)]
        x2, l2 = ds[(0, 2)]
    assert any("b_truncated.JPEG" in str(m.message) for m in w)
    assert (l1, l2) == (2, 2)  # both replaced by the next good index, 3
    assert ds.bad_image_count == 2
    assert torch.equal(x1, ds[(0, 1)][0]) and ds.bad_image_count == 3  # deterministic, counted again
    assert ds[(0, 0)][1] == 0 and ds.bad_image_count == 3


# --------------------------------------------------------------------------- loader


def test_sampler_shards_partition_an_epoch():
    n, bs = 23, 6
    whole = ShardedBatchSampler(n, bs, shuffle=True, seed=2)
    r0 = ShardedBatchSampler(n, bs, shuffle=True, seed=2, shard=(0, 2))
    r1 = ShardedBatchSampler(n, bs, shuffle=True, seed=2, shard=(1, 2))
    for e in (0, 1):
        for s in (whole, r0, r1):
            s.set_epoch(e)
        bw, b0, b1 = list(whole), list(r0), list(r1)
        assert len(bw) == len(b0) == len(b1) == len(whole) == 4  # 6, 6, 6, 5
        for a, b, c in zip(bw, b0, b1):
            assert b + c == a and len(b) >= 1 and len(c) >= 1
        idx = [i for b in b0 + b1 for _, i in b]
        assert sorted(idx) == list(range(n)) and all(k[0] == e for b in bw for k in b)
    whole.set_epoch(0)
    first = [i for b in whole for _, i in b]
    whole.set_epoch(1)
    assert first != [i for b in whole for _, i in b]
    # a 1-sample remainder is folded into the previous batch (min_batch = 2 * world_size)
    assert [len(b) for b in ShardedBatchSampler(13, 6, False, shard=(0, 1))] == [6, 7]


def test_loader_workers_match_in_process_and_shards(folder, folder_root):
    m = make_search_manifest(folder, 0.5, 0.25, seed=0)
    ds = ImageNetDataset.from_manifest(m, "train", folder_root, size=32, seed=1)
    assert ds.train and ds.num_classes == 3 and len(ds) == 14
    ref = ImageNetLoader(ds, batch_size=4, shuffle=True, seed=3, num_workers=0, min_batch=4)
    # pin_memory=True is the GPU setting (DeviceBatches on a CUDA device): run its path here too
    # (torch pins only where an accelerator exists, and says so once)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*pin_memory.*")
        par = ImageNetLoader(ds, batch_size=4, shuffle=True, seed=3, num_workers=2, prefetch_factor=2,
                             min_batch=4, pin_memory=True)
    assert par.dataloader.pin_memory is True
    for epoch in (0, 1):
        ref.set_epoch(epoch)
        par.set_epoch(epoch)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*pin_memory.*")
            a, b = list(ref), list(par)
        assert len(a) == len(b) == len(ref)
        for (xa, ya), (xb, yb) in zip(a, b):
            assert xa.dtype == torch.uint8 and xa.shape[1:] == (3, 32, 32) and ya.dtype == torch.int64
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
        if epoch == 0:
            first = a
    assert not torch.equal(first[0][0], a[0][0])
    # two ranks: their batches concatenate to the unsharded batches (same min_batch)
    ref.set_epoch(0)
    shards = []
    for rank in (0, 1):
        ld = ImageNetLoader(ds, batch_size=4, shuffle=True, seed=3, shard=(rank, 2), num_workers=0)
        ld.set_epoch(0)
        shards.append(list(ld))
    for (x, y), (x0, y0), (x1, y1) in zip(first, *shards):
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)


def test_normalize_on_device():
    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    y = inet.normalize(x, "cpu")
    mean = torch.tensor(inet.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(inet.IMAGENET_STD).view(1, 3, 1, 1)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, (x.float() / 255 - mean) / std)
    with pytest.raises(ValueError):
        inet.normalize(x.float(), "cpu")
