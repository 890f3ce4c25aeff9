"""Throughput of the ImageNet host pipeline (decode + uint8 augmentation), CPU only.

Writes ImageNet-like JPEGs (500x375, quality 90, upsampled noise: smooth but
detailed content, about 40 KB each) into a temporary folder and measures, in
one process with one thread (= images per second per core):

* the training transform at 224 (RandomResizedCrop + flip) with the default
  torch ``uint8`` resize, with and without JPEG draft mode, with Pillow's
  resize, with colour jitter; the validation transform;
* where the time goes: header + crop draw, decode, PIL -> tensor, crop/resize,
  flip;
* decode by ``simplejpeg`` when it is importable (not a dependency);
* the ``ImageNetLoader`` (DataLoader with 2 worker processes, batch 64).

Everything is repeated ``--runs`` times (other jobs may share the machine: every
run is reported, with the load average).  Usage::

    OMP_NUM_THREADS=1 python benchmarks/imagenet_loader.py [--images 64] [--runs 2]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from adarts_kernels.data import jpeg  # noqa: E402
from adarts_kernels.data.imagenet import ImageNetDataset, ImageNetLoader  # noqa: E402

SIZE = 224
RESULTS = Path(__file__).resolve().parent / "results"


def write_images(root: Path, n: int, w: int = 500, h: int = 375) -> list:
    d = root / "train" / "n00000000"
    d.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        rng = np.random.default_rng(i)
        small = rng.integers(0, 256, size=(h // 12, w // 12, 3), dtype=np.uint8)
        img = Image.fromarray(small, "RGB").resize((w, h), Image.Resampling.BICUBIC)
        p = d / f"img_{w}x{h}_{i:04d}.JPEG"
        img.save(p, quality=90)
        paths.append(p)
    return paths


def rate(fn, paths, min_time: float = 1.5) -> float:
    """Images per second of ``fn(path, i)`` over ``paths`` (cycled), at least ``min_time`` s."""
    for i, p in enumerate(paths[:8]):  # warm-up
        fn(p, i)
    n, t0 = 0, time.perf_counter()
    while True:
        for p in paths:
            fn(p, n)
            n += 1
        dt = time.perf_counter() - t0
        if dt >= min_time:
            return n / dt


def stages(paths) -> dict:
    """Milliseconds per image of each stage of the default training transform."""
    import torch.nn.functional as F

    def header(p, i):
        with Image.open(p) as img:
            jpeg.random_resized_crop_params(img.size[0], img.size[1], jpeg.sample_rng(0, 0, i))

    def decode(p, i):
        with Image.open(p) as img:
            img.load()

    decoded = []
    for p in paths[:16]:
        with Image.open(p) as img:
            img.load()
            decoded.append(img.copy())
    arrays = [jpeg._hwc(im) for im in decoded]

    def to_tensor(p, i):
        jpeg._hwc(decoded[i % len(decoded)])

    def crop_resize(p, i):
        hwc = arrays[i % len(arrays)]
        t, l, h, w = jpeg.random_resized_crop_params(hwc.shape[1], hwc.shape[0], jpeg.sample_rng(0, 0, i))
        x = hwc[t:t + h, l:l + w].permute(2, 0, 1).unsqueeze(0)
        F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", antialias=True)[0].contiguous()

    def crop_resize_pil(p, i):
        im = decoded[i % len(decoded)]
        t, l, h, w = jpeg.random_resized_crop_params(im.size[0], im.size[1], jpeg.sample_rng(0, 0, i))
        im.resize((SIZE, SIZE), Image.Resampling.BILINEAR, box=(l, t, l + w, t + h))

    out = torch.zeros(3, SIZE, SIZE, dtype=torch.uint8)

    def flip(p, i):
        out.flip(-1)

    res = {}
    for name, fn in (("header + crop draw", header), ("decode (Pillow, libjpeg-turbo)", decode),
                     ("PIL -> uint8 tensor", to_tensor), ("crop + resize (torch uint8)", crop_resize),
                     ("crop + resize (Pillow)", crop_resize_pil), ("flip (torch)", flip)):
        res[name] = 1e3 / rate(fn, paths, 0.7)
    try:
        import simplejpeg

        blobs = [Path(p).read_bytes() for p in paths]

        def sj(p, i):
            simplejpeg.decode_jpeg(blobs[i % len(blobs)], colorspace="RGB")

        def sj_fast(p, i):
            simplejpeg.decode_jpeg(blobs[i % len(blobs)], colorspace="RGB", fastdct=True, fastupsample=True)

        res["decode (simplejpeg, into numpy)"] = 1e3 / rate(sj, paths, 0.7)
        res["decode (simplejpeg fastdct+fastupsample)"] = 1e3 / rate(sj_fast, paths, 0.7)
    except ImportError:
        pass
    return res


def transforms(paths) -> dict:
    def train(**kw):
        return lambda p, i: jpeg.load_train_image(p, SIZE, jpeg.sample_rng(0, 0, i), **kw)

    res = {
        "train, torch resize, draft (default)": rate(train(), paths),
        "train, torch resize, no draft": rate(train(use_draft=False), paths),
        "train, Pillow resize, draft": rate(train(resize="pil"), paths),
        "train + colour jitter": rate(train(jitter=True), paths),
        "val (Resize 256 + CenterCrop 224)": rate(lambda p, i: jpeg.load_val_image(p, SIZE), paths),
    }
    try:
        import simplejpeg
        import torch.nn.functional as F

        def sj_train(p, i):
            data = Path(p).read_bytes()
            rng = jpeg.sample_rng(0, 0, i)
            w, h = simplejpeg.decode_jpeg_header(data)[:2][::-1]
            t, l, ch, cw = jpeg.random_resized_crop_params(w, h, rng)
            flip = rng.random() < 0.5
            hwc = torch.from_numpy(simplejpeg.decode_jpeg(data, colorspace="RGB"))
            x = F.interpolate(hwc[t:t + ch, l:l + cw].permute(2, 0, 1).unsqueeze(0), size=(SIZE, SIZE),
                              mode="bilinear", antialias=True)[0].contiguous()
            return x.flip(-1) if flip else x

        res["train, simplejpeg decode + torch resize (not in the library)"] = rate(sj_train, paths)
    except ImportError:
        pass
    return res


def loader_rate(root: Path, paths, workers: int = 2, batch: int = 64, epochs: int = 2) -> float:
    samples = [(str(p.relative_to(root)), 0) for p in paths] * max(1, 512 // len(paths))
    ds = ImageNetDataset(root, samples, train=True, size=SIZE)
    ld = ImageNetLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, prefetch_factor=4)
    ld.set_epoch(0)
    for _ in ld:  # starts the persistent workers, warms the page cache
        pass
    n, t0 = 0, time.perf_counter()
    for e in range(1, epochs + 1):
        ld.set_epoch(e)
        for x, _ in ld:
            n += x.shape[0]
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS / "imagenet_loader_cpu"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    try:
        import simplejpeg
        sj = simplejpeg.__version__
    except ImportError:
        sj = None
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor() or platform.machine()
    meta = {
        "date": datetime.date.today().isoformat(), "cpu": cpu, "cpus_seen": os.cpu_count(),
        "torch": torch.__version__, "pillow": Image.__version__, "numpy": np.__version__,
        "simplejpeg": sj, "python": platform.python_version(), "size": SIZE,
        "images": f"{args.images} JPEGs 500x375 quality 90 (upsampled noise)",
        "threads": 1, "note": "other jobs may have been running on the machine; every run is reported",
    }
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = write_images(root, args.images)
        meta["mean_file_kb"] = round(sum(p.stat().st_size for p in paths) / len(paths) / 1024, 1)
        for _ in range(args.runs):
            run = {"load_average_before": os.getloadavg()[0]}
            run["images_per_s_per_core"] = transforms(paths)
            run["ms_per_image_by_stage"] = stages(paths)
            run["dataloader_2_workers_images_per_s"] = loader_rate(root, paths)
            run["load_average_after"] = os.getloadavg()[0]
            runs.append(run)
            print(json.dumps(run, indent=1), flush=True)
    out = {"meta": meta, "runs": runs}
    Path(args.out + ".json").write_text(json.dumps(out, indent=1) + "\n")
    lines = [
        f"# ImageNet host pipeline at {SIZE}x{SIZE} (decode + uint8 augmentation)",
        "",
        f"Measured {meta['date']} on {cpu} ({meta['cpus_seen']} CPUs seen, 1 thread per process), "
        f"torch {meta['torch']}, Pillow {meta['pillow']}"
        + (f", simplejpeg {sj}" if sj else "") + f"; {meta['images']}, {meta['mean_file_kb']} KB each. "
        "Other jobs may have been running on the machine (load average given per run).",
        "",
        "| images/s per core | " + " | ".join(f"run {i + 1}" for i in range(len(runs))) + " |",
        "|---|" + "---:|" * len(runs),
    ]
    for k in runs[0]["images_per_s_per_core"]:
        lines.append(f"| {k} | " + " | ".join(f"{r['images_per_s_per_core'][k]:.0f}" for r in runs) + " |")
    lines.append("| ImageNetLoader, 2 worker processes, batch 64 (images/s, both cores) | "
                 + " | ".join(f"{r['dataloader_2_workers_images_per_s']:.0f}" for r in runs) + " |")
    lines.append("| load average (before / after) | " + " | ".join(
        f"{r['load_average_before']:.2f} / {r['load_average_after']:.2f}" for r in runs) + " |")
    lines += ["", "| stage of the training transform (ms per image) | "
              + " | ".join(f"run {i + 1}" for i in range(len(runs))) + " |", "|---|" + "---:|" * len(runs)]
    for k in runs[0]["ms_per_image_by_stage"]:
        lines.append(f"| {k} | " + " | ".join(f"{r['ms_per_image_by_stage'][k]:.3f}" for r in runs) + " |")
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("wrote", args.out + ".json", "and .md")


if __name__ == "__main__":
    main()
