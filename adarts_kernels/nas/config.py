"""Run configurations of the search and retrain loops (docs/method.md sections 1 and 4): presets,
:class:`SearchConfig`, :class:`RetrainConfig`, their checks, and the device choice.

The drivers (:mod:`adarts_kernels.commands`) only parse arguments into one of these and call
:func:`~adarts_kernels.nas.search_loop.run_search` / :func:`~adarts_kernels.nas.retrain_loop.run_retrain`.
Every setting is checked by :meth:`SearchConfig.resolved` / :meth:`RetrainConfig.resolved`,
before anything is written, loaded or built: a bad one raises ``ValueError`` naming it (the
drivers print it as one ``error:`` line and exit with code 2).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Union

import torch

from .. import backend
from ..distributed import DEFAULT_CHECK_EVERY, DEFAULT_TIMEOUT_S, launched
from . import genotypes as G
from .search_model import check_impl_name, resolve_kernels

#: Search presets. ``adarts``: the authors' public defaults (docs/method.md section 4); ``pcdarts``:
#: PC-DARTS's large-batch setting; ``digits``: small enough that the embedded digits
#: search finishes in a couple of minutes on 2 CPU cores.
SEARCH_PRESETS: Dict[str, dict] = {
    "adarts": dict(C=16, layers=8, batch_size=64, lr=0.025, epochs=80, warmup_epochs=15, arch_lr=6e-4),
    "pcdarts": dict(C=16, layers=8, batch_size=256, lr=0.1, epochs=50, warmup_epochs=15, arch_lr=6e-4),
    "digits": dict(C=8, layers=5, batch_size=64, lr=0.05, epochs=10, warmup_epochs=3, arch_lr=6e-4),
    # PC-DARTS's ImageNet search: cosine over 50 epochs after a linear lr warm-up over 5 epochs
    # (when the batch exceeds 256), architecture updates from epoch 35 with Adam lr 6e-3
    "imagenet": dict(C=16, layers=8, batch_size=1024, lr=0.5, epochs=50, warmup_epochs=35, arch_lr=6e-3,
                     lr_schedule="cosine", lr_warmup_epochs=5),
}

_IMAGENET_RETRAIN = dict(C=48, layers=14, epochs=250, auxiliary=True, drop_path=0.0, cutout=0, weight_decay=3e-5,
                         label_smoothing=0.1, top5=True)

#: Retrain presets. ``darts``: docs/method.md section 1 with DARTS's defaults; ``digits``: a small
#: network for the embedded data set.
RETRAIN_PRESETS: Dict[str, dict] = {
    "darts": dict(C=36, layers=20, batch_size=96, lr=0.025, epochs=600, auxiliary=True,
                  drop_path=0.3, cutout=16, weight_decay=3e-4),
    "digits": dict(C=16, layers=6, batch_size=64, lr=0.05, epochs=30, auxiliary=True,
                   drop_path=0.1, cutout=4, weight_decay=3e-4),
    # NetworkImageNet, DARTS's recipe: lr x0.97 every epoch
    "imagenet-darts": dict(_IMAGENET_RETRAIN, batch_size=128, lr=0.1, lr_schedule="step"),
    # NetworkImageNet, PC-DARTS's recipe: 5 warm-up epochs (batch > 256), then linear decay to 0
    "imagenet-pcdarts": dict(_IMAGENET_RETRAIN, batch_size=1024, lr=0.5, lr_schedule="linear",
                             lr_warmup_epochs=5),
}

#: the lr schedules of the presets: ``cosine`` (to ``lr_min``), ``step`` (x :data:`STEP_GAMMA` every
#: epoch), ``linear`` (to 0 at the end); the CIFAR and digits presets keep the cosine schedule of
#: ``torch.optim.lr_scheduler.CosineAnnealingLR`` (``lr_schedule`` unset)
LR_SCHEDULES = ("cosine", "step", "linear")
STEP_GAMMA = 0.97
#: the lr warm-up (``lr_warmup_epochs``) applies only when the batch exceeds this (PC-DARTS's rule)
WARMUP_MIN_BATCH = 256
#: the data sets read from an ImageFolder (``--data DIR`` with ``train/`` and ``val/``)
IMAGENET = "imagenet"
DATASETS = ("digits", "cifar10", "cifar100", IMAGENET)


@dataclass
class SearchConfig:
    """Everything a search run needs; ``None`` fields are filled from the preset.

    ``kernels``: ``"auto"`` (fused for the adarts edge, plain PyTorch for the baselines),
    ``"fused"`` or ``"modules"`` (the plain-PyTorch modules). ``impl``: the backend of the
    fused ops, one of :data:`adarts_kernels.backend.IMPLS` (``None``: the
    ``ADARTS_KERNELS_IMPL`` environment default, ``"auto"`` when unset).
    """
    dataset: str = "digits"
    data: Optional[str] = None
    download: bool = False
    out: str = "runs/search"
    preset: Optional[str] = None
    edge: str = "adarts"
    k: Optional[int] = None     # 1/k of the channels; None: 2 on ImageNet, 4 otherwise
    kernels: str = "auto"       # "auto" (fused for the adarts edge), "fused" or "modules"
    impl: Optional[str] = None  # backend of the fused ops; None: ADARTS_KERNELS_IMPL or "auto"
    recompute: str = "none"     # "none" or "edge" (keep only edge inputs; re-run edges in backward)
    amp: bool = False           # bfloat16 autocast (float32 by default)
    channels_last: bool = False
    cuda_graphs: bool = False   # replay the step from CUDA graphs (nas/graphs.py); one GPU, first order
    C: Optional[int] = None
    layers: Optional[int] = None
    batch_size: Optional[Union[int, str]] = None   # an int, or "auto" (largest that fits the GPU)
    lr: Optional[float] = None
    lr_min: float = 0.0
    momentum: float = 0.9
    weight_decay: float = 3e-4
    grad_clip: float = 5.0
    epochs: Optional[int] = None
    warmup_epochs: Optional[int] = None
    arch_lr: Optional[float] = None     # the preset's (6e-4; 6e-3 for imagenet)
    arch_betas: Tuple[float, float] = (0.5, 0.999)
    arch_weight_decay: float = 1e-3
    unrolled: bool = False
    image_size: int = 16  # digits (default 16) or ImageNet (a multiple of 32; the commands default to 224)
    limit: Optional[int] = None  # use at most this many images per split (smoke runs)
    seed: int = 2
    device: str = "auto"
    progress: bool = True
    resume: bool = False
    dist_timeout: float = DEFAULT_TIMEOUT_S  # torchrun: seconds a collective waits for the other ranks
    check_every: int = DEFAULT_CHECK_EVERY  # torchrun: steps between two cross-rank checks of the weights (0: never)
    # ImageNet only (None / False otherwise): the search's per-class subsets, the loader's worker
    # processes (None: min(8, cores)), undecodable files replaced and counted instead of stopping the run
    train_fraction: Optional[float] = None
    arch_fraction: Optional[float] = None
    workers: Optional[int] = None
    skip_bad_images: bool = False
    lr_schedule: Optional[str] = None       # None: CosineAnnealingLR (CIFAR, digits); else LR_SCHEDULES
    lr_warmup_epochs: Optional[int] = None  # linear lr warm-up epochs, when the batch exceeds 256

    def resolved(self) -> "SearchConfig":
        """A copy with the preset applied, the kernels and backend named, and the learning
        rate scaled to the batch size."""
        name = self.preset or {"digits": "digits", IMAGENET: "imagenet"}.get(self.dataset, "adarts")
        if name not in SEARCH_PRESETS:
            raise ValueError(f"unknown search preset {name!r}; expected one of {sorted(SEARCH_PRESETS)}")
        c = dataclasses.replace(self, preset=name)
        if c.k is None:
            c.k = 2 if c.dataset == IMAGENET else 4
        if c.dataset == IMAGENET:
            c.train_fraction = 0.1 if c.train_fraction is None else c.train_fraction
            c.arch_fraction = 0.025 if c.arch_fraction is None else c.arch_fraction
        c.kernels = resolve_kernels(c.edge, c.kernels, c.recompute)
        c.impl = resolve_impl_name(c.impl)
        c = _apply_preset(c, SEARCH_PRESETS[name], scale_lr=c.batch_size != "auto")
        _check_search(c)
        return c


@dataclass
class RetrainConfig:
    """Everything a retrain run needs; ``None`` fields are filled from the preset."""
    genotype: str = "ADARTS_V1"
    dataset: str = "digits"
    data: Optional[str] = None
    download: bool = False
    out: str = "runs/retrain"
    preset: Optional[str] = None
    C: Optional[int] = None
    layers: Optional[int] = None
    batch_size: Optional[int] = None
    lr: Optional[float] = None
    momentum: float = 0.9
    weight_decay: Optional[float] = None    # the preset's (3e-4; 3e-5 for imagenet-*)
    grad_clip: float = 5.0
    epochs: Optional[int] = None
    auxiliary: Optional[bool] = None
    auxiliary_weight: float = 0.4
    drop_path: Optional[float] = None
    cutout: Optional[int] = None
    image_size: int = 16
    limit: Optional[int] = None
    seed: int = 0
    device: str = "auto"
    progress: bool = True
    resume: bool = False
    dist_timeout: float = DEFAULT_TIMEOUT_S  # torchrun: seconds a collective waits for the other ranks
    check_every: int = DEFAULT_CHECK_EVERY  # torchrun: steps between two cross-rank checks of the weights (0: never)
    # ImageNet only (None / False otherwise): as in SearchConfig, plus the training loss's label
    # smoothing and the top-5 accuracy of the final evaluation
    workers: Optional[int] = None
    skip_bad_images: bool = False
    lr_schedule: Optional[str] = None
    lr_warmup_epochs: Optional[int] = None
    label_smoothing: Optional[float] = None
    top5: Optional[bool] = None
    cuda_graphs: bool = False   # replay the step from a CUDA graph (nas/graphs.py); one GPU

    def resolved(self) -> "RetrainConfig":
        name = self.preset or {"digits": "digits", IMAGENET: "imagenet-darts"}.get(self.dataset, "darts")
        if name not in RETRAIN_PRESETS:
            raise ValueError(f"unknown retrain preset {name!r}; expected one of {sorted(RETRAIN_PRESETS)}")
        G.load(self.genotype)  # fail early on an unknown name or a bad file
        c = _apply_preset(dataclasses.replace(self, preset=name), RETRAIN_PRESETS[name])
        _check_retrain(c)
        return c


def resolve_impl_name(impl: Optional[str]) -> str:
    """``impl`` checked and lower-cased, ``None`` replaced by the ``ADARTS_KERNELS_IMPL``
    default. Raises ``ValueError`` naming the valid backends for an unknown name."""
    name = check_impl_name(impl)
    return backend.default_impl() if name is None else name


def check_impl(cfg: SearchConfig, device: torch.device) -> None:
    """Refuse, before anything is written, an explicit backend that cannot run on ``device``
    (extension not built, no Triton, no GPU...). Only the fused kernels have a backend."""
    if cfg.kernels != "fused":
        return
    try:
        backend.resolve(cfg.impl, device)
    except RuntimeError as e:
        raise ValueError(f"impl={cfg.impl!r} cannot run the fused kernels on {device}: {e}") from None


def check_cuda_graphs(cfg, device: torch.device) -> None:
    """Refuse ``cuda_graphs`` where the step cannot be captured (before anything is written): a
    device other than a GPU, or a run under torchrun (data parallelism, even with one process:
    its all-reduce and global channel selection are collectives the graphs do not hold)."""
    if not getattr(cfg, "cuda_graphs", False):
        return
    if launched():
        raise ValueError("--cuda-graphs captures a one-process step; it cannot run under torchrun (data "
                         "parallelism): drop --cuda-graphs, or run one process without torchrun")
    if device.type != "cuda":
        raise ValueError(f"--cuda-graphs captures the step into CUDA graphs and needs a CUDA device, got {device}")


def _apply_preset(c, preset: dict, scale_lr: bool = True):
    """Fill ``c``'s unset fields from ``preset``; an unset lr follows the linear scaling rule
    (docs/method.md section 4): the preset's lr times batch size over the preset's batch size.
    ``scale_lr=False`` (batch size ``"auto"``, not known yet) leaves both for later."""
    for key, value in preset.items():
        if key != "lr" and getattr(c, key) is None:
            setattr(c, key, value)
    if isinstance(c.batch_size, str) and c.batch_size != "auto":
        raise ValueError(f"batch_size must be a positive integer or 'auto', got {c.batch_size!r}")
    if scale_lr and c.lr is None:
        c.lr = scaled_lr(preset, c.batch_size)
    _check_common(c)
    return c


def scaled_lr(preset: dict, batch_size: int) -> float:
    """The linear scaling rule (docs/method.md section 4): ``preset lr * batch_size / preset batch``."""
    return preset["lr"] * batch_size / preset["batch_size"]


#: seeds are kept in [0, 2**32): the loops seed generators with ``(seed * 1_000_003 + epoch) * 4099
#: + rank``, which stays within torch's 64-bit seeds for any such seed
SEED_LIMIT = 2 ** 32


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_common(c) -> None:
    """The checks shared by both configs: data set, sizes, lr, seed, device, the torchrun
    settings. Each refusal names the setting (as its flag) and the value given."""
    if c.dataset not in DATASETS:
        raise ValueError(f"unknown dataset {c.dataset!r}; expected digits, cifar10, cifar100 or imagenet")
    if c.dataset == "digits" and (c.data is not None or c.download):
        raise ValueError("--data/--download are for CIFAR: the digits data set is embedded (scikit-learn); "
                         "drop them, or pass --dataset cifar10/cifar100")
    for key in ("epochs", "C"):
        if getattr(c, key) < 1:
            raise ValueError(f"--{key} must be at least 1, got {getattr(c, key)}")
    if c.batch_size != "auto" and c.batch_size < 2:
        # one sample at 1x1 resolution (the auxiliary head) cannot be batch-normalised in training
        raise ValueError(f"--batch-size must be at least 2 (BatchNorm trains on the statistics of the batch), "
                         f"got {c.batch_size}")
    if c.layers < 3:
        raise ValueError(f"--layers must be at least 3 (two reduction cells and a normal one), got {c.layers}")
    if c.limit is not None and c.limit < 1:
        raise ValueError(f"--limit must be at least 1, got {c.limit}")
    if c.lr is not None and not (_finite(c.lr) and c.lr > 0):
        raise ValueError(f"--lr must be a positive finite number, got {c.lr}")
    if not 0 <= c.seed < SEED_LIMIT:
        raise ValueError(f"--seed must be in [0, 2**32), got {c.seed}")
    check_device_name(c.device)
    if not (_finite(c.dist_timeout) and c.dist_timeout > 0):
        raise ValueError(f"--dist-timeout must be a positive finite number of seconds, got {c.dist_timeout}")
    if c.check_every < 0:
        raise ValueError(f"--check-every must be >= 0 (0: never), got {c.check_every}")
    _check_imagenet(c)


def _check_imagenet(c) -> None:
    """The ImageNet settings: refused with another data set, checked with ImageNet."""
    given = [f"--{k.replace('_', '-')}" for k in ("train_fraction", "arch_fraction", "workers")
             if getattr(c, k, None) is not None] + (["--skip-bad-images"] if c.skip_bad_images else [])
    if c.dataset != IMAGENET:
        if given:
            raise ValueError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for --dataset imagenet "
                             f"only (an ImageFolder read from --data), not {c.dataset}")
        return
    if c.data is None:
        raise ValueError("--dataset imagenet needs --data DIR: the folder holding train/<class>/ and val/<class>/")
    if c.download:
        raise ValueError("--download is for CIFAR: ImageNet cannot be downloaded; pass --data DIR")
    if not (isinstance(c.image_size, int) and c.image_size >= 32 and c.image_size % 32 == 0):
        raise ValueError(f"--image-size must be a positive multiple of 32 on ImageNet (the stems divide by 8, "
                         f"then two reductions), got {c.image_size}")
    if c.workers is not None and c.workers < 0:
        raise ValueError(f"--workers must be >= 0 (0: decode in the main process), got {c.workers}")
    tf, af = getattr(c, "train_fraction", None), getattr(c, "arch_fraction", None)
    for name, v in (("--train-fraction", tf), ("--arch-fraction", af)):
        if v is not None and not (_finite(v) and 0 < v <= 1):
            raise ValueError(f"{name} must be in (0, 1], got {v}")
    if tf is not None and af is not None and tf + af > 1 + 1e-12:
        raise ValueError(f"--train-fraction {tf} + --arch-fraction {af} = {tf + af:g} exceeds 1: the weight and "
                         f"architecture subsets are disjoint draws from each class")
    if c.lr_schedule is not None and c.lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr schedule {c.lr_schedule!r}; expected one of {', '.join(LR_SCHEDULES)}")
    if c.lr_warmup_epochs is not None and c.lr_warmup_epochs < 0:
        raise ValueError(f"lr warm-up epochs must be >= 0, got {c.lr_warmup_epochs}")
    ls = getattr(c, "label_smoothing", None)
    if ls is not None and not (_finite(ls) and 0 <= ls < 1):
        raise ValueError(f"label smoothing must be in [0, 1), got {ls}")


def _check_search(c: SearchConfig) -> None:
    """A search's own settings: k (the edge's 1/k of the channels) and the warm-up."""
    if c.k < 1:
        raise ValueError(f"--k must be at least 1 (1/k of the channels go through the candidates), got {c.k}")
    if c.edge != "darts" and c.C % c.k:
        divisors = [d for d in range(1, c.C + 1) if c.C % d == 0]
        raise ValueError(f"--C {c.C} is not divisible by --k {c.k} (1/k of the channels go through the "
                         f"candidates); choose --k among {', '.join(map(str, divisors))}, or another --C")
    if c.warmup_epochs < 0:
        raise ValueError(f"--warmup-epochs must be >= 0, got {c.warmup_epochs}")
    if c.cuda_graphs and c.unrolled:
        raise ValueError("--cuda-graphs captures the first-order architecture step only; drop --unrolled or "
                         "--cuda-graphs")
    if c.cuda_graphs and c.batch_size == "auto":
        raise ValueError("--cuda-graphs with --batch-size auto: the probe measures eager steps, while a graphed "
                         "run keeps its graph memory reserved when an odd-sized last batch runs eagerly; give "
                         "--batch-size N")


def _check_retrain(c: RetrainConfig) -> None:
    """A retrain's own settings: drop-path and cutout."""
    if not (_finite(c.drop_path) and 0 <= c.drop_path < 1):
        raise ValueError(f"--drop-path must be in [0, 1) (a probability; 1 would drop every path), "
                         f"got {c.drop_path}")
    if c.cutout < 0:
        raise ValueError(f"--cutout must be >= 0 (0: off), got {c.cutout}")


#: what ``--device`` accepts
DEVICE_FORMS = "auto, cpu, cuda or cuda:N"


def check_device_name(name) -> None:
    """Refuse a ``device`` that is neither ``"auto"`` nor a CPU or CUDA device name, with one
    sentence instead of torch's list of every device type it knows. Whether a CUDA device
    is present is checked later, by :func:`resolve_device`."""
    if name == "auto":
        return
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"--device {name} is not a device; expected {DEVICE_FORMS}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: the {dev.type} device is not supported; expected {DEVICE_FORMS}")


def resolve_device(name: str) -> torch.device:
    """``"auto"``: the first CUDA device if torch sees one, else the CPU; otherwise ``name``,
    refused when it names CUDA and torch sees none."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} asked for, but this torch sees no CUDA device")
    return dev
