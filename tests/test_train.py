"""Search / retrain loops (adarts_kernels.nas.loops, .config, .checkpoint), the Architect and the CLI drivers.

Every run uses a tiny slice of the embedded digits data (``limit=32`` images per split,
8x8 images, C=4, 3 cells, batch 16) so that one epoch takes about a second on 2 CPU cores.
"""
from __future__ import annotations

import copy
import dataclasses
import importlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from adarts_kernels.data import DataError
from adarts_kernels.nas import genotypes as G
from adarts_kernels.nas import loop_common, loops, retrain_loop, search_loop
from adarts_kernels.nas.architect import Architect
from adarts_kernels.nas.config import RetrainConfig, SearchConfig
from adarts_kernels.nas.loops import run_retrain, run_search
from adarts_kernels.nas.search_model import SearchNetwork
from adarts_kernels.utils import io as io_mod
from adarts_kernels.utils.io import load_checkpoint, read_jsonl

REPO = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ARCH_NAMES = ("alphas_normal", "alphas_reduce", "betas_normal", "betas_reduce")
N_EDGES, N_OPS = 14, 8

TINY_SEARCH = dict(dataset="digits", image_size=8, limit=32, C=4, layers=3, batch_size=16, epochs=1,
                   warmup_epochs=0, progress=False, device="cpu")
TINY_RETRAIN = dict(dataset="digits", image_size=8, limit=32, C=4, layers=3, batch_size=16, epochs=1,
                    auxiliary=False, progress=False, device="cpu")


def search_cfg(out, **kw) -> SearchConfig:
    return SearchConfig(out=str(out), **{**TINY_SEARCH, **kw})


def retrain_cfg(out, **kw) -> RetrainConfig:
    return RetrainConfig(out=str(out), **{**TINY_RETRAIN, **kw})


def initial_arch(cfg: SearchConfig) -> dict:
    """The architecture parameters run_search starts from (same seed, same construction)."""
    c = cfg.resolved()
    torch.manual_seed(c.seed)
    net = SearchNetwork(c.C, 10, c.layers, edge=c.edge, k=c.k)
    return {n: p.detach().clone() for n, p in net.named_parameters() if n in ARCH_NAMES}


def assert_tree_equal(a, b, where="") -> None:
    """Bitwise equality of nested dicts / lists / tensors / plain values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"tensors differ at {where}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"keys differ at {where}: {set(a) ^ set(b)}"
        for k in a:
            assert_tree_equal(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_tree_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def without_seconds(records):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def search_log(out):
    """The per-epoch records of a search's log.jsonl, after checking its header record."""
    recs = read_jsonl(out / "log.jsonl")
    assert recs and recs[0]["kind"] == "header", recs[:1]
    assert all(r.get("kind") != "header" for r in recs[1:])
    return recs[1:]


def load_driver(name: str):
    """The command module behind ``python/<name>.py`` and ``adarts-<name>``."""
    return importlib.import_module(f"adarts_kernels.commands.{name}")


class Interrupted(Exception):
    """Raised by an on_epoch_end hook to simulate a run killed after an epoch."""


def interrupt_after(epoch_to_stop: int):
    def hook(epoch, rec):
        assert rec["epoch"] == epoch + 1
        if epoch == epoch_to_stop:
            raise Interrupted(f"stopped after epoch {epoch}")
    return hook


# ----------------------------------------------------------------------------- shared runs

@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These networks are tiny: one intra-op thread is as fast as two, and immune to the
    huge slow-downs of an oversubscribed CPU (OpenMP spin-waits when other processes run)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def search_runs(tmp_path_factory):
    """Memoised tiny searches: ``search_runs(**overrides) -> out dir`` (each runs once)."""
    cache = {}

    def get(**kw):
        key = tuple(sorted(kw.items()))
        if key not in cache:
            out = tmp_path_factory.mktemp("search")
            run_search(search_cfg(out, **kw))
            cache[key] = out
        return cache[key]
    return get


@pytest.fixture(scope="module")
def two_epoch_search(search_runs):
    """The uninterrupted reference for the resume tests: adarts, 2 epochs."""
    return search_runs(edge="adarts", epochs=2)


@pytest.fixture(scope="module")
def retrain_pc_darts(tmp_path_factory):
    out = tmp_path_factory.mktemp("retrain")
    result = run_retrain(retrain_cfg(out, genotype="PC_DARTS"))
    return out, result


# ----------------------------------------------------------------------------- 1. search outputs

@pytest.mark.parametrize("edge", ["adarts", "pcdarts", "darts"])
def test_one_epoch_search_writes_outputs_and_moves_arch(search_runs, edge):
    out = search_runs(edge=edge)
    assert sorted(os.listdir(out)) == ["cells.png", "checkpoint.pt", "genotype.json", "log.jsonl", "run.lock"]

    # log.jsonl: one record per epoch
    recs = search_log(out)
    assert len(recs) == 1
    rec = recs[0]
    for key in ("epoch", "train_loss", "train_acc", "valid_acc", "genotype", "normal_skip_connect",
                "alpha_normal", "alpha_reduce"):
        assert key in rec, key
    assert rec["epoch"] == 1
    assert rec["train_loss"] > 0 and 0 <= rec["train_acc"] <= 100 and 0 <= rec["valid_acc"] <= 100
    assert rec["arch_loss"] is not None and rec["arch_loss"] > 0  # architecture steps did run
    for key in ("alpha_normal", "alpha_reduce"):
        alpha = torch.tensor(rec[key], dtype=torch.float64)
        assert alpha.shape == (N_EDGES, N_OPS)
        assert torch.allclose(alpha.sum(1), torch.ones(N_EDGES, dtype=torch.float64), atol=1e-5)
        assert (alpha > 0).all()
    if edge == "darts":
        assert "beta_normal" not in rec and "beta_reduce" not in rec
    else:
        for key in ("beta_normal", "beta_reduce"):
            beta = torch.tensor(rec[key], dtype=torch.float64)
            assert beta.shape == (N_EDGES,)
            start = 0
            for node in range(4):  # normalised over the edges entering each node
                n = 2 + node
                assert beta[start:start + n].sum().item() == pytest.approx(1.0, abs=1e-5)
                start += n

    # genotype.json, consistent with the log
    geno = G.load(str(out / "genotype.json"))
    assert G.to_dict(geno) == rec["genotype"]
    assert rec["normal_skip_connect"] == G.count_skips(geno.normal)
    assert len(geno.normal) == 8 and len(geno.reduce) == 8

    # cells.png
    with open(out / "cells.png", "rb") as f:
        assert f.read(8) == PNG_SIGNATURE

    # checkpoint layout
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["kind"] == "search" and ckpt["epoch"] == 0
    assert ckpt["config"]["edge"] == edge and ckpt["config"]["C"] == 4 and ckpt["config"]["limit"] == 32
    assert ckpt["genotype"] == rec["genotype"]
    assert without_seconds(ckpt["history"]) == without_seconds(recs)
    for key in ("w_opt", "a_opt", "sched", "rng"):
        assert key in ckpt

    # the architecture moved away from its initial values (warm-up 0: arch steps ran)
    init = initial_arch(search_cfg(out, edge=edge))
    assert set(init) == ({"alphas_normal", "alphas_reduce"} if edge == "darts" else set(ARCH_NAMES))
    for name, p0 in init.items():
        p = ckpt["model"][name]
        assert p.shape == p0.shape
        assert not torch.equal(p, p0), f"{name} unchanged by the search"
    # and the logged alpha is the softmax of the saved one
    assert torch.allclose(torch.tensor(rec["alpha_normal"]), F.softmax(ckpt["model"]["alphas_normal"], -1),
                          atol=1e-6)


def test_warmup_covering_all_epochs_leaves_arch_untouched(tmp_path):
    cfg = search_cfg(tmp_path, edge="pcdarts", epochs=1, warmup_epochs=1)
    run_search(cfg)
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    init = initial_arch(cfg)
    assert set(init) == set(ARCH_NAMES)
    for name, p0 in init.items():
        assert torch.equal(ckpt["model"][name], p0), f"{name} changed during warm-up"
    # ... while the weights were trained
    torch.manual_seed(cfg.seed)
    fresh = SearchNetwork(4, 10, 3, edge="pcdarts").state_dict()
    assert not torch.equal(ckpt["model"]["stem.0.weight"], fresh["stem.0.weight"])
    rec = search_log(tmp_path)[0]
    assert rec["arch_loss"] is None
    assert ckpt["a_opt"]["state"] == {}  # Adam never stepped


# ----------------------------------------------------------------------------- 2. second order

def test_second_order_search_runs_and_moves_arch(search_runs):
    out = search_runs(edge="adarts", unrolled=True)
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["config"]["unrolled"] is True
    init = initial_arch(search_cfg(out, edge="adarts"))
    first = load_checkpoint(search_runs(edge="adarts") / "checkpoint.pt")
    for name, p0 in init.items():
        p = ckpt["model"][name]
        assert torch.isfinite(p).all()
        assert not torch.equal(p, p0), f"{name} unchanged by the second-order search"
    # the unrolled step really is a different update than the first-order one
    assert any(not torch.equal(ckpt["model"][n], first["model"][n]) for n in init)
    assert len(search_log(out)) == 1
    G.load(str(out / "genotype.json"))


def _batches(n=8, size=8, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    xt = torch.randn(n, 3, size, size, generator=g).to(dtype)
    yt = torch.randint(0, 10, (n,), generator=g)
    xv = torch.randn(n, 3, size, size, generator=g).to(dtype)
    yv = torch.randint(0, 10, (n,), generator=g)
    return xt, yt, xv, yv


@pytest.mark.parametrize("unrolled", [False, True], ids=["first", "second"])
@pytest.mark.parametrize("edge", ["adarts", "darts"])
def test_architect_step_changes_only_arch_parameters(edge, unrolled):
    torch.manual_seed(0)
    model = SearchNetwork(4, 10, 3, edge=edge, kernels="modules")
    model.train()
    xt, yt, xv, yv = _batches()
    w_opt = torch.optim.SGD(model.weight_parameters(), lr=0.05, momentum=0.9, weight_decay=3e-4)
    # one weight step so that the momentum buffers exist (the unrolled step reads them)
    w_opt.zero_grad()
    model.loss(xt, yt).backward()
    w_opt.step()
    w_opt.zero_grad(set_to_none=True)

    arch = Architect(model, lr=0.01, unrolled=unrolled)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if n not in ARCH_NAMES}
    alphas = {n: p.detach().clone() for n, p in model.named_parameters() if n in ARCH_NAMES}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    momenta = [w_opt.state[p]["momentum_buffer"].clone() for p in model.weight_parameters()]

    loss = arch.step(xt, yt, xv, yv, eta=0.05, weight_optimizer=w_opt)
    assert loss.dim() == 0 and not loss.requires_grad and torch.isfinite(loss)

    for n, p in model.named_parameters():
        if n in ARCH_NAMES:
            assert not torch.equal(p.detach(), alphas[n]), f"arch parameter {n} not updated"
        else:
            assert torch.equal(p.detach(), weights[n]), f"weight {n} changed by the architecture step"
    for m0, p in zip(momenta, model.weight_parameters()):
        assert torch.equal(w_opt.state[p]["momentum_buffer"], m0), "momentum buffer changed"
    if unrolled:  # the look-ahead and finite differences run forwards; buffers must be restored
        for n, b in model.named_buffers():
            assert torch.equal(b, buffers[n]), f"buffer {n} not restored after the unrolled step"


def _smooth(model: nn.Module) -> nn.Module:
    """ReLU -> Softplus, MaxPool -> AvgPool: a twice-differentiable network, so that the
    finite-difference Hessian-vector product converges (ReLU kinks are ~1e-6 away in a
    random supernet, which a perturbation of size R=0.01 crosses)."""
    for mod in list(model.modules()):
        for name, child in list(mod.named_children()):
            if isinstance(child, nn.ReLU):
                setattr(mod, name, nn.Softplus(beta=2.0))
            elif isinstance(child, nn.MaxPool2d):
                setattr(mod, name, nn.AvgPool2d(child.kernel_size, child.stride, child.padding,
                                                count_include_pad=False))
    return model


@pytest.mark.parametrize("edge", ["darts", "pcdarts"])
def test_unrolled_gradient_with_zero_eta_is_first_order(edge):
    torch.manual_seed(0)
    model = SearchNetwork(4, 10, 3, edge=edge, kernels="modules")
    with torch.no_grad():
        for a in model.arch_parameters():
            a.normal_(0.0, 1.0)
    xt, yt, xv, yv = _batches()
    params = model.arch_parameters()
    expected = torch.autograd.grad(model.loss(xv, yv), params)
    assert any(e.abs().max() > 0 for e in expected)

    arch = Architect(model, unrolled=True)
    for a in params:
        a.grad = None
    arch._unrolled_grads(xt, yt, xv, yv, 0.0, None)
    for a, e in zip(params, expected):
        torch.testing.assert_close(a.grad, e, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("edge", ["darts", "pcdarts"])
def test_unrolled_gradient_matches_exact_second_order(edge):
    """grad_alpha L_val(w - eta*(dL_train/dw + wd*w + mu*m), alpha), by double backprop."""
    torch.manual_seed(0)
    model = _smooth(SearchNetwork(4, 10, 3, edge=edge, kernels="modules")).double()
    with torch.no_grad():
        for a in model.arch_parameters():
            a.normal_(0.0, 1.0)
    xt, yt, xv, yv = _batches(dtype=torch.float64)
    eta, mu, wd = 0.5, 0.9, 3e-4
    w_opt = torch.optim.SGD(model.weight_parameters(), lr=0.01, momentum=mu, weight_decay=wd)
    w_opt.zero_grad()
    model.loss(xt, yt).backward()
    w_opt.step()
    w_opt.zero_grad(set_to_none=True)

    named = dict(model.named_parameters())
    arch_params = model.arch_parameters()
    wnames = [n for n in named if n not in ARCH_NAMES]
    ws = [named[n] for n in wnames]
    g_train = torch.autograd.grad(model.loss(xt, yt), ws, create_graph=True)
    look_ahead = {n: w - eta * (g + wd * w + mu * w_opt.state[w]["momentum_buffer"])
                  for n, w, g in zip(wnames, ws, g_train)}
    look_ahead.update({n: named[n] for n in ARCH_NAMES if n in named})
    loss_val = F.cross_entropy(torch.func.functional_call(model, look_ahead, (xv,)), yv)
    exact = torch.autograd.grad(loss_val, arch_params)
    first_order = torch.autograd.grad(model.loss(xv, yv), arch_params)

    weights_before = [w.detach().clone() for w in ws]
    arch = Architect(model, unrolled=True)
    for a in arch_params:
        a.grad = None
    arch._unrolled_grads(xt, yt, xv, yv, eta, w_opt)
    for w, w0 in zip(ws, weights_before):
        assert torch.equal(w.detach(), w0)
    for a, e, f in zip(arch_params, exact, first_order):
        tol = 2e-2 * e.abs().max().item()
        # the second-order term matters here, so the comparison can tell the two apart
        assert (e - f).abs().max().item() > 10 * tol
        torch.testing.assert_close(a.grad, e, rtol=0.0, atol=tol)


# ----------------------------------------------------------------------------- 3. retrain

def _check_retrain_out(out, result, geno_dict):
    assert {"checkpoint.pt", "log.jsonl", "result.json", "cells.png"} <= set(os.listdir(out))
    with open(out / "result.json") as f:
        saved = json.load(f)
    assert 0.0 <= saved["test_acc"] <= 100.0
    assert saved["test_loss"] > 0
    assert saved["params"] > 0
    assert saved["genotype"] == geno_dict
    assert saved["test_acc"] == result["test_acc"]
    recs = read_jsonl(out / "log.jsonl")
    assert len(recs) == 1 and recs[0]["epoch"] == 1
    for key in ("lr", "drop_path", "train_loss", "train_acc", "valid_loss", "valid_acc", "seconds"):
        assert key in recs[0], key
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["kind"] == "retrain" and ckpt["epoch"] == 0
    assert ckpt["genotype"] == geno_dict
    assert without_seconds(ckpt["history"]) == without_seconds(recs)
    with open(out / "cells.png", "rb") as f:
        assert f.read(8) == PNG_SIGNATURE


def test_retrain_published_genotype(retrain_pc_darts):
    out, result = retrain_pc_darts
    _check_retrain_out(out, result, G.to_dict(G.PC_DARTS))


def test_retrain_searched_genotype_json(tmp_path, search_runs):
    geno_path = search_runs(edge="adarts") / "genotype.json"
    result = run_retrain(retrain_cfg(tmp_path, genotype=str(geno_path), auxiliary=True))
    _check_retrain_out(tmp_path, result, G.to_dict(G.load(str(geno_path))))


# ----------------------------------------------------------------------------- 4. resume

def test_search_resume_is_bitwise_identical(tmp_path, two_epoch_search):
    a = two_epoch_search
    cfg = search_cfg(tmp_path, edge="adarts", epochs=2)
    with pytest.raises(Interrupted):
        run_search(cfg, on_epoch_end=interrupt_after(0))
    mid = load_checkpoint(tmp_path / "checkpoint.pt")
    assert mid["epoch"] == 0
    assert len(search_log(tmp_path)) == 1
    assert not (tmp_path / "genotype.json").exists()

    seen = []
    result = run_search(dataclasses.replace(cfg, resume=True), on_epoch_end=lambda e, r: seen.append(e))
    assert seen == [1]  # only the missing epoch ran

    ca, cb = load_checkpoint(a / "checkpoint.pt"), load_checkpoint(tmp_path / "checkpoint.pt")
    assert ca["epoch"] == cb["epoch"] == 1
    for key in ("model", "w_opt", "a_opt", "sched", "rng", "genotype"):
        assert_tree_equal(ca[key], cb[key], key)
    assert without_seconds(ca["history"]) == without_seconds(cb["history"])
    recs_a, recs_b = search_log(a), search_log(tmp_path)
    assert len(recs_a) == len(recs_b) == 2
    assert without_seconds(recs_a) == without_seconds(recs_b)
    assert G.load(str(a / "genotype.json")) == G.load(str(tmp_path / "genotype.json"))
    assert result["genotype"] == ca["genotype"]


def test_retrain_resume_with_drop_path_is_bitwise_identical(tmp_path):
    # 3 epochs, interrupted after the second: drop-path is 0 in epoch 1, so only an
    # interruption after a drop-path epoch tells whether the global RNG state is restored
    kw = dict(genotype="PC_DARTS", epochs=3, auxiliary=True, drop_path=0.3, cutout=2)
    a, b = tmp_path / "a", tmp_path / "b"
    res_a = run_retrain(retrain_cfg(a, **kw))
    with pytest.raises(Interrupted):
        run_retrain(retrain_cfg(b, **kw), on_epoch_end=interrupt_after(1))
    assert load_checkpoint(b / "checkpoint.pt")["epoch"] == 1
    assert not (b / "result.json").exists()
    res_b = run_retrain(retrain_cfg(b, resume=True, **kw))

    ca, cb = load_checkpoint(a / "checkpoint.pt"), load_checkpoint(b / "checkpoint.pt")
    assert ca["epoch"] == cb["epoch"] == 2
    assert any(k.startswith("auxiliary_head") for k in ca["model"])
    for key in ("model", "opt", "sched", "rng", "genotype"):
        assert_tree_equal(ca[key], cb[key], key)
    recs_a, recs_b = read_jsonl(a / "log.jsonl"), read_jsonl(b / "log.jsonl")
    assert [r["drop_path"] for r in recs_a] == pytest.approx([0.0, 0.1, 0.2])  # drop-path was used
    assert without_seconds(recs_a) == without_seconds(recs_b)
    assert res_a["test_acc"] == res_b["test_acc"] and res_a["test_loss"] == res_b["test_loss"]


# ----------------------------------------------------------------------------- 5. atomic checkpoint

def test_checkpoint_write_failure_keeps_previous_checkpoint(tmp_path, monkeypatch, two_epoch_search):
    real_save = torch.save
    calls = []

    def flaky_save(obj, f, *args, **kwargs):
        calls.append(obj.get("epoch") if isinstance(obj, dict) else None)
        if len(calls) == 2:
            f.write(b"\x80\x02 half a checkpoint")
            raise OSError("simulated: disk full")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(io_mod.torch, "save", flaky_save)
    cfg = search_cfg(tmp_path, edge="adarts", epochs=2)
    with pytest.raises(OSError, match="simulated"):
        run_search(cfg)
    assert calls == [0, 1]
    monkeypatch.undo()

    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["epoch"] == 0 and len(ckpt["history"]) == 1
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt", "log.jsonl", "run.lock"]  # no temporary left behind
    assert len(search_log(tmp_path)) == 1  # the log matches the checkpoint

    run_search(dataclasses.replace(cfg, resume=True))
    final = load_checkpoint(tmp_path / "checkpoint.pt")
    ref = load_checkpoint(two_epoch_search / "checkpoint.pt")
    assert final["epoch"] == 1
    assert_tree_equal(ref["model"], final["model"], "model")
    assert without_seconds(search_log(tmp_path)) == \
        without_seconds(search_log(two_epoch_search))


# ----------------------------------------------------------------------------- 6. refusals

def test_existing_run_without_resume_is_refused(tmp_path, two_epoch_search):
    shutil.copy(two_epoch_search / "checkpoint.pt", tmp_path / "checkpoint.pt")
    before = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(FileExistsError, match="--resume"):
        run_search(search_cfg(tmp_path, edge="adarts", epochs=2))
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


def test_retrain_existing_run_without_resume_is_refused(tmp_path, retrain_pc_darts):
    out, _ = retrain_pc_darts
    shutil.copy(out / "checkpoint.pt", tmp_path / "checkpoint.pt")
    with pytest.raises(FileExistsError, match="--resume"):
        run_retrain(retrain_cfg(tmp_path, genotype="PC_DARTS"))


def test_resume_with_other_settings_is_refused(tmp_path, two_epoch_search):
    shutil.copy(two_epoch_search / "checkpoint.pt", tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match=r"\bC\b.*checkpoint 4 vs now 8"):
        run_search(search_cfg(tmp_path, edge="adarts", epochs=2, C=8, resume=True))
    with pytest.raises(ValueError, match="edge"):
        run_search(search_cfg(tmp_path, edge="pcdarts", epochs=2, resume=True))
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 1  # untouched


def test_retrain_resume_with_other_settings_or_genotype_is_refused(tmp_path, retrain_pc_darts):
    out, _ = retrain_pc_darts
    shutil.copy(out / "checkpoint.pt", tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match="layers"):
        run_retrain(retrain_cfg(tmp_path, genotype="PC_DARTS", layers=4, resume=True))
    with pytest.raises(ValueError, match="genotype"):
        run_retrain(retrain_cfg(tmp_path, genotype="DARTS_V2", resume=True))


def test_unknown_genotype_name_lists_valid_names(tmp_path):
    with pytest.raises(ValueError) as info:
        run_retrain(retrain_cfg(tmp_path / "out", genotype="NO_SUCH_CELL"))
    msg = str(info.value)
    assert "NO_SUCH_CELL" in msg
    for name in G.PUBLISHED:
        assert name in msg
    assert not (tmp_path / "out").exists()  # refused before anything was created


@pytest.mark.parametrize("make, match", [
    (lambda: SearchConfig(dataset="mnist").resolved(), "mnist"),
    (lambda: RetrainConfig(dataset="mnist").resolved(), "mnist"),
    (lambda: SearchConfig(preset="huge").resolved(), "huge"),
    (lambda: RetrainConfig(preset="huge").resolved(), "huge"),
    (lambda: SearchConfig(limit=0).resolved(), "limit"),
    (lambda: SearchConfig(epochs=0).resolved(), "epochs"),
], ids=["search-dataset", "retrain-dataset", "search-preset", "retrain-preset", "limit", "epochs"])
def test_bad_config_values_are_refused(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("runner", ["search", "retrain"])
def test_missing_cifar_dir_raises_data_error_naming_it(tmp_path, runner):
    missing = tmp_path / "no_such_data_dir"
    if runner == "search":
        call = lambda: run_search(SearchConfig(dataset="cifar10", data=str(missing), out=str(tmp_path / "o"),
                                               progress=False, device="cpu"))
    else:
        call = lambda: run_retrain(RetrainConfig(dataset="cifar10", data=str(missing), out=str(tmp_path / "o"),
                                                 progress=False, device="cpu"))
    with pytest.raises(DataError) as info:
        call()
    assert str(missing) in str(info.value)


# ----------------------------------------------------------------------------- 7. CLI drivers

@pytest.fixture(scope="module")
def search_cli():
    return load_driver("search")


@pytest.fixture(scope="module")
def retrain_cli():
    return load_driver("retrain")


@pytest.mark.parametrize("driver", ["search", "retrain"])
def test_cli_missing_cifar_data_is_exit_code_2(driver, search_cli, retrain_cli, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    main = (search_cli if driver == "search" else retrain_cli).main
    missing = tmp_path / "nonexistent"
    rc = main(["--dataset", "cifar10", "--data", str(missing), "--out", str(tmp_path / "o"),
               "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "error:" in err and str(missing) in err


def test_cli_retrain_unknown_genotype_is_exit_code_2(retrain_cli, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc = retrain_cli.main(["--genotype", "NO_SUCH_CELL", "--out", str(tmp_path / "o"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "error:" in err and "NO_SUCH_CELL" in err and "PC_DARTS" in err


def test_cli_search_existing_run_is_exit_code_2(search_cli, tmp_path, monkeypatch, capsys, two_epoch_search):
    monkeypatch.chdir(tmp_path)
    shutil.copy(two_epoch_search / "checkpoint.pt", tmp_path / "checkpoint.pt")
    rc = search_cli.main(["--out", str(tmp_path), "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "error:" in err and "--resume" in err


@pytest.mark.parametrize("driver", ["search", "retrain"])
def test_cli_help_exits_0(driver, search_cli, retrain_cli, capsys):
    main = (search_cli if driver == "search" else retrain_cli).main
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "usage:" in out and "--resume" in out and "--limit" in out


def test_cli_tiny_search_then_retrain(search_cli, retrain_cli, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    s_out, r_out = tmp_path / "s", tmp_path / "r"
    rc = search_cli.main(["--limit", "32", "--C", "4", "--layers", "3", "--batch-size", "16", "--epochs", "1",
                          "--warmup-epochs", "0", "--no-progress", "--device", "cpu", "--out", str(s_out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "genotype written to" in captured.out
    geno = G.load(str(s_out / "genotype.json"))
    ckpt = load_checkpoint(s_out / "checkpoint.pt")
    assert ckpt["config"]["image_size"] == 16 and ckpt["config"]["limit"] == 32
    assert ckpt["config"]["edge"] == "adarts" and ckpt["config"]["warmup_epochs"] == 0
    assert len(search_log(s_out)) == 1

    rc = retrain_cli.main(["--genotype", str(s_out / "genotype.json"), "--limit", "32", "--C", "4",
                           "--layers", "3", "--batch-size", "16", "--epochs", "1", "--no-auxiliary",
                           "--no-progress", "--device", "cpu", "--out", str(r_out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "test accuracy" in captured.out
    with open(r_out / "result.json") as f:
        result = json.load(f)
    assert result["genotype"] == G.to_dict(geno) and 0 <= result["test_acc"] <= 100
    assert not (tmp_path / "runs").exists()  # --out was honoured


# ----------------------------------------------------------------------------- kernels, recompute, batch

def test_search_fused_and_recompute_follow_the_reference(search_runs):
    """The fused kernels and edge recomputation compute the same function: one epoch of
    search gives the same losses and architecture (up to float32 rounding)."""
    runs = {kr: search_runs(edge="adarts", kernels=kr[0], recompute=kr[1])
            for kr in (("modules", "none"), ("fused", "none"), ("fused", "edge"))}
    recs = {kr: search_log(out)[-1] for kr, out in runs.items()}
    base = recs[("modules", "none")]
    for kr, rec in recs.items():
        assert abs(rec["train_loss"] - base["train_loss"]) < 1e-3, kr
        assert abs(rec["valid_loss"] - base["valid_loss"]) < 1e-3, kr
        for key in ("alpha_normal", "beta_normal"):
            assert torch.allclose(torch.tensor(rec[key]), torch.tensor(base[key]), atol=1e-5), (kr, key)


def test_search_config_kernel_choices():
    assert SearchConfig(edge="adarts").resolved().kernels == "fused"
    assert SearchConfig(edge="pcdarts").resolved().kernels == "modules"
    with pytest.raises(ValueError, match="adarts edge only"):
        SearchConfig(edge="pcdarts", kernels="fused").resolved()
    with pytest.raises(ValueError, match="unknown recompute"):
        SearchConfig(recompute="all").resolved()
    with pytest.raises(ValueError, match="positive integer or 'auto'"):
        SearchConfig(batch_size="big").resolved()
    cfg = SearchConfig(batch_size="auto").resolved()
    assert cfg.batch_size == "auto" and cfg.lr is None      # scaled once the probe has run


def test_batch_size_auto_and_channels_last_need_a_gpu(tmp_path):
    with pytest.raises(ValueError, match="needs a CUDA device"):
        run_search(search_cfg(tmp_path / "run", batch_size="auto"))
    with pytest.raises(ValueError, match="channels_last is a GPU option"):
        run_search(search_cfg(tmp_path / "run2", channels_last=True))


def test_search_driver_flags(tmp_path):
    search = load_driver("search")
    with pytest.raises(SystemExit):
        search.main(["--batch-size", "0"])
    out = tmp_path / "drv"
    rc = search.main(["--limit", "32", "--C", "4", "--layers", "3", "--batch-size", "16", "--epochs", "1",
                      "--warmup-epochs", "0", "--no-progress", "--device", "cpu", "--kernels", "fused",
                      "--recompute", "edge", "--out", str(out)])
    assert rc == 0
    assert (out / "genotype.json").exists()
    ck = load_checkpoint(str(out / "checkpoint.pt"))
    assert ck["config"]["kernels"] == "fused" and ck["config"]["recompute"] == "edge"


def test_search_step_returns_device_tensors():
    torch.manual_seed(0)
    net = SearchNetwork(C=4, num_classes=10, layers=3, edge="adarts", kernels="fused")
    arch = Architect(net)
    w = list(net.weight_parameters())
    opt = torch.optim.SGD(w, lr=0.1, momentum=0.9)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    alpha0, stem0 = net.alphas_normal.detach().clone(), net.stem[0].weight.detach().clone()
    loss, logits, vloss = loops.search_step(net, arch, opt, w, x, y, x, y, 0.1, 5.0)
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0 and not loss.requires_grad
    assert logits.shape == (4, 10) and vloss is not None and vloss.dim() == 0
    assert not torch.equal(net.alphas_normal, alpha0)      # the architecture step ran
    assert not torch.equal(net.stem[0].weight, stem0)      # and the weight step


# ----------------------------------------------------------------------------- batch size auto, on CPU

def capped_trial(capacity: int, then=None):
    """A probe trial that runs out of memory above ``capacity`` (as a GPU would), else
    calls ``then(b)`` if given; records the batches it was asked for."""
    seen = []

    def trial(b):
        seen.append(b)
        if b > capacity:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {b} MiB")
        if then is not None:
            then(b)
    return trial, seen


def test_batch_size_auto_search_end_to_end_and_resume(tmp_path, capsys):
    """``--batch-size auto`` on CPU through an injected probe: 40 fits, 48 does not, so the
    run takes 90% of 40 rounded down to a multiple of 8 (32), the digits preset's lr scaled
    linearly (0.05 x 32/64), and a resumed run keeps both without probing again."""
    cfg = search_cfg(tmp_path, edge="adarts", batch_size="auto", epochs=2)
    trial, seen = capped_trial(40)
    with pytest.raises(Interrupted):
        run_search(cfg, on_epoch_end=interrupt_after(0), batch_trial=trial)
    assert seen == [16, 32, 64, 48, 40]          # doubling, then bisection down to 8

    assert sorted(os.listdir(tmp_path)) == ["auto_batch.json", "checkpoint.pt", "log.jsonl", "run.lock"]
    auto = json.loads((tmp_path / "auto_batch.json").read_text())
    assert auto == {"max_fit": 40, "batch_size": 32, "margin": 0.9, "lr": 0.05 * 32 / 64,
                    "lr_rule": "0.05 x 32/64", "device": "cpu",
                    "tried": [[16, True], [32, True], [64, False], [48, False], [40, True]]}
    err = capsys.readouterr().err
    assert "batch 32 (auto: largest fit 40), lr 0.025," in err

    header = read_jsonl(tmp_path / "log.jsonl")[0]
    assert header["kind"] == "header" and header["batch_size"] == 32 and header["lr"] == 0.025
    assert header["auto_batch"] == auto
    recs = search_log(tmp_path)
    assert [r["batch_size"] for r in recs] == [32] and recs[0]["lr"] == 0.025
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["config"]["batch_size"] == 32 and ckpt["config"]["lr"] == 0.025

    def must_not_probe(b):
        raise AssertionError("a resumed run must not probe the batch size again")
    run_search(dataclasses.replace(cfg, resume=True), batch_trial=must_not_probe)
    assert json.loads((tmp_path / "auto_batch.json").read_text()) == auto
    assert read_jsonl(tmp_path / "log.jsonl")[0] == header       # the header of the run's start
    recs = search_log(tmp_path)
    assert [r["batch_size"] for r in recs] == [32, 32] and [r["epoch"] for r in recs] == [1, 2]
    final = load_checkpoint(tmp_path / "checkpoint.pt")
    assert final["epoch"] == 1 and final["config"]["batch_size"] == 32 and final["config"]["lr"] == 0.025
    assert final["header"] == header


def test_auto_batch_keeps_a_given_lr_and_an_unfit_start_is_an_error():
    cfg = search_cfg("unused", batch_size="auto", lr=0.01).resolved()
    torch.manual_seed(0)
    model = SearchNetwork(4, 10, 3)
    found = loops.auto_batch(cfg, model, torch.device("cpu"), 10, 8, trial=capped_trial(1000)[0])
    assert found["max_fit"] == 1000 and found["batch_size"] == 896
    assert cfg.batch_size == 896 and cfg.lr == 0.01 and found["lr_rule"] == "given"
    cfg = search_cfg("unused", batch_size="auto").resolved()
    with pytest.raises(RuntimeError, match="even batch 16 does not fit"):
        loops.auto_batch(cfg, model, torch.device("cpu"), 10, 8, trial=capped_trial(8)[0])
    with pytest.raises(ValueError, match="needs a CUDA device"):    # no trial: the real probe, GPU only
        loops.auto_batch(cfg, model, torch.device("cpu"), 10, 8)


@pytest.mark.parametrize("fake_cuda", [False, True], ids=["cpu", "cuda-branch"])
def test_step_pair_trial_runs_real_steps_on_a_copy(monkeypatch, fake_cuda):
    """The default probe's every line on CPU: two real search steps per trial on a copy of
    the model (the model itself untouched); with the device check answering "CUDA", the
    CUDA-only calls (synchronize, peak-memory reset, device name) are made as on a GPU."""
    calls = []
    if fake_cuda:
        monkeypatch.setattr(search_loop, "_is_cuda", lambda device: True)
        monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(("sync", str(device))))
        monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats",
                            lambda device=None: calls.append(("reset", str(device))))
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    cfg = search_cfg("unused", batch_size="auto").resolved()
    torch.manual_seed(0)
    model = SearchNetwork(4, 10, 3)
    before = copy.deepcopy(model.state_dict())
    device = torch.device("cpu")
    steps = []
    real_step = search_loop.search_step

    def counting_step(*args, **kwargs):
        steps.append(args[4].shape[0])
        return real_step(*args, **kwargs)
    monkeypatch.setattr(search_loop, "search_step", counting_step)
    trial, seen = capped_trial(24, then=loops.step_pair_trial(cfg, model, device, 10, 8))
    found = loops.auto_batch(cfg, model, device, 10, 8, trial=trial)
    assert seen == [16, 32, 24] and steps == [16, 16, 24, 24]     # two steps per fitting batch
    assert found["max_fit"] == 24 and found["batch_size"] == 16 and cfg.batch_size == 16
    assert cfg.lr == pytest.approx(0.05 * 16 / 64)
    assert_tree_equal(before, model.state_dict(), "model")      # the probe ran on a copy
    if fake_cuda:
        assert calls == [("reset", "cpu"), ("sync", "cpu"), ("sync", "cpu")]
        assert found["device"] == "Fake GPU"
    else:
        assert found["device"] == "cpu"


# ----------------------------------------------------------------------------- backend switch

FUSED_OPS = ("attention_score", "attention_gather", "attention_writeback", "mixed_sum")


def test_search_log_header_names_the_backends(search_runs, monkeypatch):
    from adarts_kernels.backend import resolve
    monkeypatch.delenv("ADARTS_KERNELS_IMPL", raising=False)
    fused = read_jsonl(search_runs(edge="adarts") / "log.jsonl")[0]
    expected = resolve("auto", torch.device("cpu"))
    assert fused["kind"] == "header" and fused["run"] == "search"
    assert fused["kernels"] == "fused" and fused["impl"] == "auto"
    assert fused["backends"] == {op: expected for op in FUSED_OPS}
    assert fused["torch"] == torch.__version__ and fused["device"] == "cpu"
    assert fused["batch_size"] == 16 and fused["auto_batch"] is None
    ckpt = load_checkpoint(search_runs(edge="adarts") / "checkpoint.pt")
    assert ckpt["header"] == fused and ckpt["config"]["impl"] == "auto"
    modules = read_jsonl(search_runs(edge="pcdarts") / "log.jsonl")[0]
    assert modules["kind"] == "header" and modules["kernels"] == "modules" and modules["backends"] is None


def test_impl_reaches_every_fused_op_from_the_cli(tmp_path, monkeypatch):
    """``--impl reference``: the config, the header and every fused kernel call (the edges'
    one-node path calls the ops' kernels directly, forward and backward) say "reference"."""
    import inspect

    from adarts_kernels.nn import fused_function as FF
    seen = []
    kernels = {"attention_score": ("score_fwd_kernel", "score_bwd_kernel"),
               "attention_gather": ("gather_fwd_kernel", "gather_bwd_kernel"),
               "attention_writeback": ("writeback_fwd_kernel", "writeback_bwd_kernel"),
               "mixed_sum": ("mixed_sum_fwd_kernel", "mixed_sum_bwd_kernel")}
    assert set(kernels) == set(FUSED_OPS)
    for op, names in kernels.items():
        for name in names:
            real = getattr(FF, name)
            sig = inspect.signature(real)

            def spy(*a, _op=op, _r=real, _sig=sig, **kw):
                seen.append((_op, _sig.bind(*a, **kw).arguments["impl"]))
                return _r(*a, **kw)
            monkeypatch.setattr(FF, name, spy)
    search = load_driver("search")
    out = tmp_path / "drv"
    rc = search.main(["--limit", "32", "--C", "4", "--layers", "3", "--batch-size", "16", "--epochs", "1",
                      "--warmup-epochs", "0", "--no-progress", "--device", "cpu", "--impl", "reference",
                      "--out", str(out)])
    assert rc == 0
    assert {op for op, _ in seen} == set(FUSED_OPS)
    assert {impl for _, impl in seen} == {"reference"}
    assert load_checkpoint(out / "checkpoint.pt")["config"]["impl"] == "reference"
    header = read_jsonl(out / "log.jsonl")[0]
    assert header["impl"] == "reference" and header["backends"] == {op: "reference" for op in FUSED_OPS}


def test_impl_default_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("ADARTS_KERNELS_IMPL", "reference")
    assert SearchConfig().resolved().impl == "reference"
    assert SearchConfig(impl="AUTO").resolved().impl == "auto"      # an explicit choice wins
    monkeypatch.delenv("ADARTS_KERNELS_IMPL")
    assert SearchConfig().resolved().impl == "auto"


def test_bad_impl_is_refused_early(tmp_path, monkeypatch, capsys):
    with pytest.raises(ValueError, match="unknown backend impl='fast'.*'triton'"):
        SearchConfig(impl="fast").resolved()
    # an explicit backend that cannot run on the device: refused before anything is written
    with pytest.raises(ValueError, match="impl='cuda' cannot run the fused kernels on cpu.*cuda"):
        run_search(search_cfg(tmp_path / "run", impl="cuda"))
    assert not (tmp_path / "run").exists()
    # the plain-PyTorch modules have no backend to check
    assert SearchConfig(edge="darts", impl="cuda").resolved().kernels == "modules"
    search = load_driver("search")
    rc = search.main(["--impl", "cuda", "--device", "cpu", "--out", str(tmp_path / "cli"), "--no-progress"])
    assert rc == 2 and "cannot run" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        search.main(["--impl", "fast"])
    assert "invalid choice: 'fast'" in capsys.readouterr().err


def test_kernels_reference_is_now_called_modules(capsys):
    with pytest.raises(ValueError, match="now called kernels='modules'"):
        SearchConfig(kernels="reference").resolved()
    assert SearchConfig(kernels="modules").resolved().kernels == "modules"
    search = load_driver("search")
    with pytest.raises(SystemExit):
        search.main(["--kernels", "reference"])
    assert "now called 'modules'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- 8. guards

def _nan_search_step(monkeypatch, at_call: int):
    """Make the ``at_call``-th search step (1-based, over the whole run) start from a NaN weight."""
    real = search_loop.search_step
    calls = {"n": 0}

    def step(model, architect, w_opt, weights, *args, **kw):
        calls["n"] += 1
        if calls["n"] == at_call:
            with torch.no_grad():
                weights[0].view(-1)[0] = float("nan")
        return real(model, architect, w_opt, weights, *args, **kw)
    monkeypatch.setattr(search_loop, "search_step", step)


@pytest.mark.parametrize("warmup, what", [(2, "train loss"), (0, "architecture loss")])
def test_search_nan_stops_with_last_good_checkpoint_and_no_genotype(tmp_path, monkeypatch, warmup, what):
    # 32 images, batch 16: 2 steps per epoch; the 3rd step is the first of epoch 2
    _nan_search_step(monkeypatch, at_call=3)
    with pytest.raises(loops.NonFiniteError) as info:
        run_search(search_cfg(tmp_path, epochs=3, warmup_epochs=warmup))
    err = info.value
    assert (err.what, err.epoch, err.step) == (what, 2, 1), str(err)
    assert "epoch 2, step 1" in str(err) and what in str(err) and "last good epoch (1)" in str(err)
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["epoch"] == 0 and len(ckpt["history"]) == 1      # epoch 1, the last good one
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert not (tmp_path / "genotype.json").exists()
    assert len(search_log(tmp_path)) == 1


def test_search_nan_through_the_cli_is_exit_code_2(search_cli, tmp_path, monkeypatch, capsys):
    _nan_search_step(monkeypatch, at_call=1)
    out = tmp_path / "run"
    rc = search_cli.main(["--dataset", "digits", "--out", str(out), "--limit", "32", "--C", "4", "--layers", "3",
                          "--batch-size", "16", "--epochs", "1", "--warmup-epochs", "1", "--no-progress",
                          "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "non-finite train loss at epoch 1, step 1" in err and "no checkpoint" in err
    assert not (out / "checkpoint.pt").exists() and not (out / "genotype.json").exists()


def test_nan_found_between_progress_reads(tmp_path, monkeypatch):
    """With more steps than READ_EVERY the flag read every READ_EVERY steps stops the epoch early."""
    monkeypatch.setattr(search_loop, "READ_EVERY", 1)
    _nan_search_step(monkeypatch, at_call=1)
    seen = []
    real_read = loop_common._read
    monkeypatch.setattr(loop_common, "_read", lambda *a: seen.append(1) or real_read(*a))
    with pytest.raises(loops.NonFiniteError, match="step 1"):
        run_search(search_cfg(tmp_path, epochs=1, warmup_epochs=1))
    assert len(seen) == 1    # stopped at the first read, step 1 of 2


def test_retrain_nan_stops_with_last_good_checkpoint(tmp_path, monkeypatch):
    class NaNOnThirdStep(retrain_loop.EvalNetwork):
        calls = 0

        def forward(self, x):
            if self.training:
                NaNOnThirdStep.calls += 1
                if NaNOnThirdStep.calls == 3:
                    with torch.no_grad():
                        next(self.parameters()).view(-1)[0] = float("inf")
            return super().forward(x)
    monkeypatch.setattr(retrain_loop, "EvalNetwork", NaNOnThirdStep)
    with pytest.raises(loops.NonFiniteError) as info:
        run_retrain(retrain_cfg(tmp_path, genotype="PC_DARTS", epochs=3))
    assert (info.value.what, info.value.epoch, info.value.step) == ("train loss", 2, 1)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 0
    assert not (tmp_path / "result.json").exists()


def test_finite_guard_makes_no_host_read():
    guard = loops.FiniteGuard(torch.device("cpu"))
    guard.check(torch.tensor(1.0), 0, 1)
    guard.check(torch.tensor(float("nan")), 1, 2)
    guard.check(torch.tensor(float("inf")), 2, 1)   # not the first: ignored
    assert [v.item() for v in guard.values()] == [1.0, 2.0]
    with pytest.raises(loops.NonFiniteError, match="architecture loss at epoch 4, step 2"):
        guard.raise_if_bad(1, 2, 3, "somewhere")


@pytest.mark.parametrize("ckpt, match", [
    ({}, "entries missing: kind, epoch"),
    ([1, 2], "holds a list"),
    ("history", "missing: history"),
    ("kind", "'retrain' checkpoint, this is a search run"),
    ("epoch", "epoch 99 is outside this run's 2 epochs"),
    ("short_history", "history should be a list of 2"),
    ("model", "'model' state does not fit"),
], ids=["empty", "list", "no-history", "kind", "epoch", "short-history", "model"])
def test_resume_refuses_a_malformed_checkpoint_naming_the_file(tmp_path, two_epoch_search, ckpt, match):
    good = load_checkpoint(two_epoch_search / "checkpoint.pt")
    if ckpt == "history":
        ckpt = {k: v for k, v in good.items() if k != "history"}
    elif ckpt == "kind":
        ckpt = {**good, "kind": "retrain"}
    elif ckpt == "epoch":
        ckpt = {**good, "epoch": 99}
    elif ckpt == "short_history":
        ckpt = {**good, "history": good["history"][:1]}
    elif ckpt == "model":
        ckpt = {**good, "model": {"nope": torch.zeros(1)}}
    io_mod.atomic_torch_save(ckpt, tmp_path / "checkpoint.pt")
    with pytest.raises(io_mod.CheckpointError, match=match) as info:
        run_search(search_cfg(tmp_path, epochs=2, resume=True))
    assert str(tmp_path / "checkpoint.pt") in str(info.value)


def test_resume_refuses_a_flipped_bit(tmp_path, two_epoch_search):
    data = bytearray((two_epoch_search / "checkpoint.pt").read_bytes())
    data[len(data) // 2] ^= 0x10
    (tmp_path / "checkpoint.pt").write_bytes(bytes(data))
    with pytest.raises(io_mod.CheckpointError, match="corrupt: its sha256"):
        run_search(search_cfg(tmp_path, epochs=2, resume=True))


def test_run_removes_stale_temporary_files(tmp_path, two_epoch_search, capsys):
    shutil.copy(two_epoch_search / "checkpoint.pt", tmp_path / "checkpoint.pt")
    stale = tmp_path / ".checkpoint.pt.tmp-999999-3"
    stale.write_bytes(b"half a checkpoint")
    keep = tmp_path / "notes.tmp-1-2"       # not one of ours (no leading dot)
    keep.write_text("mine")
    run_search(search_cfg(tmp_path, epochs=2, resume=True))
    assert not stale.exists() and keep.exists()
    assert "removed" in capsys.readouterr().err


@pytest.mark.parametrize("change, keys", [
    (dict(kernels="modules"), ["kernels"]),
    (dict(recompute="edge"), ["recompute"]),
    (dict(amp=True), ["amp"]),
    (dict(warmup_epochs=1), ["warmup_epochs"]),
    (dict(impl="reference"), ["impl"]),
    (dict(lr=0.5), ["lr"]),
    (dict(lr=0.5, momentum=0.5), ["lr", "momentum"]),
], ids=["kernels", "recompute", "amp", "warmup", "impl", "lr", "lr-momentum"])
def test_resume_refuses_changed_settings_naming_them(tmp_path, two_epoch_search, change, keys):
    shutil.copy(two_epoch_search / "checkpoint.pt", tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match="cannot resume") as info:
        run_search(search_cfg(tmp_path, epochs=2, resume=True, **change))
    msg = str(info.value)
    for k in keys:
        assert f"{k}: checkpoint" in msg, msg
    assert msg.count(": checkpoint") == len(keys), msg


def test_retrain_resume_refuses_a_changed_lr(tmp_path, retrain_pc_darts):
    out, _ = retrain_pc_darts
    shutil.copy(out / "checkpoint.pt", tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match=r"lr: checkpoint 0\.0125 vs now 0\.3"):
        run_retrain(retrain_cfg(tmp_path, genotype="PC_DARTS", lr=0.3, resume=True))
    with pytest.raises(ValueError, match="drop_path"):
        run_retrain(retrain_cfg(tmp_path, genotype="PC_DARTS", drop_path=0.5, resume=True))


_HOLD_LOCK = """
import sys, time
from adarts_kernels.nas.checkpoint import lock_run
with lock_run(sys.argv[1]):
    print("LOCKED", flush=True)
    sys.stdin.readline()
"""


def test_second_run_into_the_same_directory_is_refused(tmp_path, search_cli, capsys):
    import subprocess
    import sys
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(tmp_path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "LOCKED"
        with pytest.raises(RuntimeError, match=rf"in use by another run \(pid {holder.pid} on .+, started "):
            run_search(search_cfg(tmp_path))
        rc = search_cli.main(["--out", str(tmp_path), "--limit", "32", "--no-progress", "--device", "cpu"])
        assert rc == 2 and f"pid {holder.pid}" in capsys.readouterr().err
        assert not (tmp_path / "checkpoint.pt").exists() and not (tmp_path / "log.jsonl").exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    run_search(search_cfg(tmp_path))       # the holder is gone: the lock is free again
    assert (tmp_path / "genotype.json").exists()


def test_progress_shows_labelled_loss_and_validation_bars_without_warnings(tmp_path, monkeypatch, capsys):
    import warnings
    monkeypatch.setattr(retrain_loop, "READ_EVERY", 1)
    monkeypatch.setattr(search_loop, "READ_EVERY", 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_retrain(retrain_cfg(tmp_path / "r", genotype="PC_DARTS", auxiliary=True, progress=True))
        run_search(search_cfg(tmp_path / "s", progress=True))
    assert not [w for w in caught if "requires_grad" in str(w.message)], [str(w.message) for w in caught]
    err = capsys.readouterr().err
    assert "last_loss=" in err and "(step 2)" in err
    assert "retrain 1/1 valid" in err and "search 1/1 valid" in err and "test" in err


def test_check_finite_parameters_names_the_bad_ones():
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    loops.check_finite_parameters(net, 0, "out")          # all finite: nothing
    with torch.no_grad():
        net[1].bias[1] = float("-inf")
    with pytest.raises(loops.NonFiniteError, match=r"non-finite parameters at epoch 3: 1\.bias;") as info:
        loops.check_finite_parameters(net, 2, "out")
    assert info.value.step is None and "last good epoch (2)" in str(info.value)
