"""``--dataset imagenet`` end to end through the search and retrain commands, on a small
ImageFolder of real JPEGs written here (3 classes, mixed sizes and modes), at 32x32."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from jpeg_helpers import smooth_image

from adarts_kernels.commands import retrain as retrain_cmd
from adarts_kernels.commands import search as search_cmd
from adarts_kernels.nas import retrain_loop, search_loop
from adarts_kernels.nas.config import RetrainConfig, SearchConfig
from adarts_kernels.nas.imagenet_run import lr_factor

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["ant", "bee", "cow"]
TRAIN_PER_CLASS = 12
VAL_PER_CLASS = 3


def write_folder(root: Path) -> None:
    sizes = [(80, 60), (60, 80), (48, 40), (100, 75), (64, 64), (36, 50)]
    for split, count in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        for k, name in enumerate(CLASSES):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(count):
                w, h = sizes[(i + k) % len(sizes)]
                mode = "L" if i == 5 else "CMYK" if i == 7 else "RGB"
                smooth_image(w, h, seed=100 * k + i + (50 if split == "val" else 0), mode=mode, cell=16).save(
                    d / f"{name}_{i:03d}.JPEG", quality=90)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imagenet") / "data"
    write_folder(root)
    return root


def search_args(data: Path, out: Path, *extra: str) -> list:
    return ["--dataset", "imagenet", "--data", str(data), "--out", str(out), "--image-size", "32", "--C", "4",
            "--layers", "3", "--batch-size", "6", "--epochs", "2", "--warmup-epochs", "1", "--train-fraction", "0.5",
            "--arch-fraction", "0.5", "--workers", "0", "--no-progress", "--device", "cpu", *extra]


def retrain_args(data: Path, out: Path, genotype: str, *extra: str) -> list:
    return ["--dataset", "imagenet", "--data", str(data), "--out", str(out), "--genotype", genotype,
            "--image-size", "32", "--C", "8", "--layers", "3", "--batch-size", "8", "--epochs", "1",
            "--workers", "0", "--no-progress", "--device", "cpu", *extra]


def run(main, args, capsys):
    code = main(args)
    return code, capsys.readouterr().err


def weights(path: Path) -> dict:
    return torch.load(path / "checkpoint.pt", map_location="cpu", weights_only=False)["model"]


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def searched(folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "search"
    assert search_cmd.main(search_args(folder, out)) == 0
    return out


def test_search_end_to_end(searched):
    assert (searched / "genotype.json").is_file() and (searched / "cells.png").is_file()
    manifest = json.loads((searched / "manifest.json").read_text())
    assert manifest["settings"] == {"kind": "search", "train_fraction": 0.5, "arch_fraction": 0.5, "seed": 2}
    train, arch = manifest["splits"]["train"]["paths"], manifest["splits"]["arch"]["paths"]
    assert len(train) == len(arch) == 3 * TRAIN_PER_CLASS // 2 and not set(train) & set(arch)
    recs = [json.loads(line) for line in (searched / "log.jsonl").read_text().splitlines()]
    header, e1, e2 = recs
    assert header["kind"] == "header" and e1["arch_loss"] is None and e2["arch_loss"] is not None
    assert e1["bad_images"] == e2["bad_images"] == 0
    assert e2["alpha_normal"] != e1["alpha_normal"]           # updated in the architecture epoch
    ckpt = torch.load(searched / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert ckpt["config"]["k"] == 2 and ckpt["config"]["preset"] == "imagenet"
    assert ckpt["model"]["classifier.weight"].shape[0] == len(CLASSES)
    assert "stem0.0.weight" in ckpt["model"]


class Stop(Exception):
    pass


def first_epoch_only(monkeypatch, args) -> None:
    """Run the command's search for its first epoch only (stopped after that epoch's checkpoint)."""
    real = search_loop.run_search

    def stop(epoch, rec):
        raise Stop()
    monkeypatch.setattr(search_cmd, "run_search", lambda cfg: real(cfg, on_epoch_end=stop))
    with pytest.raises(Stop):
        search_cmd.main(args)
    monkeypatch.setattr(search_cmd, "run_search", real)


def test_resume_is_bitwise_with_two_workers(folder, searched, tmp_path, capsys, monkeypatch):
    """2 epochs in one run == 1 epoch, stopped, then resumed to 2 (with 2 decoding workers)."""
    out = tmp_path / "resumed"
    first_epoch_only(monkeypatch, search_args(folder, out, "--workers", "2"))
    assert search_cmd.main(search_args(folder, out, "--resume", "--workers", "2")) == 0
    assert_same(weights(out), weights(searched))
    assert (out / "manifest.json").read_text() == (searched / "manifest.json").read_text()
    code, err = run(search_cmd.main, search_args(folder, out, "--resume", "--epochs", "3", "--train-fraction",
                                                 "0.4"), capsys)
    assert code == 2 and "error: cannot resume" in err and "train_fraction" in err


def test_retrain_resume_is_bitwise(folder, tmp_path, monkeypatch):
    """Retrain: 2 epochs in one run == 1 epoch, stopped after its checkpoint, then resumed."""
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert retrain_cmd.main(retrain_args(folder, whole, "PC_DARTS_image", "--epochs", "2")) == 0
    real = retrain_loop.run_retrain

    def stop(epoch, rec):
        raise Stop()
    monkeypatch.setattr(retrain_cmd, "run_retrain", lambda cfg: real(cfg, on_epoch_end=stop))
    with pytest.raises(Stop):
        retrain_cmd.main(retrain_args(folder, resumed, "PC_DARTS_image", "--epochs", "2"))
    monkeypatch.setattr(retrain_cmd, "run_retrain", real)
    assert retrain_cmd.main(retrain_args(folder, resumed, "PC_DARTS_image", "--epochs", "2", "--resume")) == 0
    assert_same(weights(resumed), weights(whole))
    results = [json.loads((d / "result.json").read_text()) for d in (resumed, whole)]
    assert [{k: v for k, v in r.items() if k != "out"} for r in results][0] == \
        {k: v for k, v in results[1].items() if k != "out"}


def test_retrain_reports_top1_and_top5(folder, searched, tmp_path):
    out = tmp_path / "retrain"
    assert retrain_cmd.main(retrain_args(folder, out, str(searched / "genotype.json"))) == 0
    result = json.loads((out / "result.json").read_text())
    assert 0 <= result["test_acc"] <= result["test_top5"] == 100.0      # 3 classes: top-5 holds every class
    ckpt = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert ckpt["config"]["preset"] == "imagenet-darts" and ckpt["config"]["label_smoothing"] == 0.1
    assert "auxiliary_head.classifier.weight" in ckpt["model"]


@pytest.mark.parametrize("args, needle", [
    (["--train-fraction", "0.01"], "selects none of them"),
    (["--train-fraction", "0.7"], "exceeds 1"),
    (["--arch-fraction", "0"], "--arch-fraction must be in (0, 1]"),
    (["--image-size", "48"], "multiple of 32"),
])
def test_search_refusals(folder, tmp_path, capsys, args, needle):
    code, err = run(search_cmd.main, search_args(folder, tmp_path / "r") + args, capsys)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err


def test_missing_val_folder_and_other_dataset(folder, tmp_path, capsys):
    bad = tmp_path / "noval"
    shutil.copytree(folder / "train", bad / "train")
    code, err = run(search_cmd.main, search_args(bad, tmp_path / "a"), capsys)
    assert code == 2 and err.startswith("error: ImageNet folder") and "val is missing" in err
    code, err = run(search_cmd.main, ["--dataset", "digits", "--train-fraction", "0.2", "--out", str(tmp_path / "b")],
                    capsys)
    assert code == 2 and "--train-fraction is for --dataset imagenet only" in err
    code, err = run(retrain_cmd.main, ["--dataset", "digits", "--skip-bad-images", "--out", str(tmp_path / "c")],
                    capsys)
    assert code == 2 and "--skip-bad-images is for --dataset imagenet only" in err


@pytest.mark.parametrize("workers", ["0", "2"])
def test_corrupt_image_mid_run(folder, tmp_path, capsys, monkeypatch, workers):
    data = tmp_path / "data"
    shutil.copytree(folder, data)
    out = tmp_path / "run"
    first_epoch_only(monkeypatch, search_args(data, out, "--workers", workers))
    before = (out / "checkpoint.pt").read_bytes()
    victim = json.loads((out / "manifest.json").read_text())["splits"]["train"]["paths"][0]
    (data / victim).write_bytes(b"\xff\xd8 not a jpeg")
    capsys.readouterr()
    code, err = run(search_cmd.main, search_args(data, out, "--resume", "--workers", workers), capsys)
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(lines) == 1 and victim.split("/")[-1] in lines[0], err
    assert "\n" not in lines[0] and "Traceback" not in err
    assert (out / "checkpoint.pt").read_bytes() == before          # epoch 1's checkpoint intact
    with pytest.warns(RuntimeWarning, match="skipping bad image") if workers == "0" else _nothing():
        code = search_cmd.main(search_args(data, out, "--resume", "--workers", workers, "--skip-bad-images"))
    assert code == 0
    recs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert recs[-1]["epoch"] == 2 and recs[-1]["bad_images"] >= 1


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_presets_and_schedules():
    s = SearchConfig(dataset="imagenet", data="x", image_size=224).resolved()
    assert (s.C, s.layers, s.batch_size, s.lr, s.epochs, s.warmup_epochs, s.k) == (16, 8, 1024, 0.5, 50, 35, 2)
    assert (s.arch_lr, s.train_fraction, s.arch_fraction, s.lr_warmup_epochs) == (6e-3, 0.1, 0.025, 5)
    assert [round(lr_factor(s, e), 6) for e in range(2)] == [0.2, round(0.4 * (1 + np.cos(np.pi / 50)) / 2, 6)]
    assert SearchConfig().resolved().arch_lr == 6e-4 and SearchConfig().resolved().k == 4
    d = RetrainConfig(dataset="imagenet", data="x", image_size=224).resolved()
    assert (d.preset, d.C, d.layers, d.batch_size, d.lr, d.weight_decay, d.label_smoothing, d.top5) == \
        ("imagenet-darts", 48, 14, 128, 0.1, 3e-5, 0.1, True)
    assert lr_factor(d, 2) == pytest.approx(0.97 ** 2)
    p = RetrainConfig(dataset="imagenet", data="x", image_size=224, preset="imagenet-pcdarts").resolved()
    assert [lr_factor(p, e) for e in (0, 4, 5, 249)] == pytest.approx([0.2, 1.0, 1.0, 1 / 245])
    assert RetrainConfig().resolved().weight_decay == 3e-4 and RetrainConfig().resolved().label_smoothing is None


def test_torchrun_two_process_search(folder, tmp_path):
    out = tmp_path / "dist"
    args = search_args(folder, out)
    args[args.index("--epochs") + 1] = "1"
    args[args.index("--warmup-epochs") + 1] = "0"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "python/search.py",
           *args]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    assert (out / "genotype.json").is_file() and (out / "manifest.json").is_file()
    rec = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()][-1]
    assert rec["world_size"] == 2 and rec["arch_loss"] is not None


def test_torchrun_two_process_retrain(folder, tmp_path):
    """Retrain under torchrun, 2 gloo processes: the global batch of 8 split 4 + 4."""
    out = tmp_path / "dist-retrain"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "python/retrain.py",
           *retrain_args(folder, out, "PC_DARTS_image")]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert 0 <= result["test_acc"] <= result["test_top5"] == 100.0
    rec = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()][-1]
    assert rec["world_size"] == 2
