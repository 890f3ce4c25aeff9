"""A capturable search step: CUDA-graph replay (``adarts_kernels.nas.graphs``, ``--cuda-graphs``),
no host synchronisation in either half of a search step, and ``torch.compile(fullgraph=True)``
of the supernet's loss.

No GPU here: the graphed steps run with the CPU stand-in graph API (``ReplayGraphAPI``: a
capture runs the body once and keeps it, a replay re-runs it and copies its results into the
static outputs, as a CUDA graph's replay rewrites them). With it, a sequence of graphed steps
must give bitwise the losses, logits, alpha, weights, optimizer states and BatchNorm buffers
of the same sequence of eager steps, through captures, recaptures and eager fallbacks for
batches of another shape. The stand-in's captures and replays run under the host-sync
detector below, as a real capture fails on a host synchronisation.

Tiny networks (C=4, 3 cells, 8x8 images, batch 4): each step takes a fraction of a second
on one CPU thread.
"""
from __future__ import annotations

import copy
import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from adarts_kernels import distributed as D
from adarts_kernels.commands import retrain as retrain_cmd
from adarts_kernels.commands import search as search_cmd
from adarts_kernels.nas import graphs, retrain_loop, search_loop
from adarts_kernels.nas import genotypes as G
from adarts_kernels.nas.architect import Architect
from adarts_kernels.nas.config import RetrainConfig, SearchConfig, check_cuda_graphs
from adarts_kernels.nas.eval_model import EvalNetwork
from adarts_kernels.nas.graphs import CudaGraphAPI, GraphedRetrainStep, GraphedSearchStep, ReplayGraphAPI
from adarts_kernels.nas.loops import run_retrain, run_search
from adarts_kernels.nas.retrain_loop import retrain_step
from adarts_kernels.nas.search_loop import search_step
from adarts_kernels.nas.search_model import SearchNetwork
from adarts_kernels.nn import units
from adarts_kernels.ops import _common
from adarts_kernels.utils.io import load_checkpoint, read_jsonl

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


# ----------------------------------------------------------------------------- the host-sync detector

class HostSyncError(AssertionError):
    """An op read device data on the host, or made an output whose shape depends on it."""


#: aten ops that read device values on the host (``.item()``, ``bool()``, ``int()``,
#: ``float()`` and ``if t:`` all end in ``_local_scalar_dense``) or whose output shape
#: depends on the data (which needs the host to read a count)
SYNC_OPS = frozenset({
    "aten::_local_scalar_dense", "aten::is_nonzero", "aten::equal", "aten::allclose",
    "aten::nonzero", "aten::argwhere", "aten::masked_select", "aten::bincount",
    "aten::unique", "aten::_unique", "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive",
    "aten::unique_dim_consecutive",
})
#: indexing ops whose output shape (or, on a GPU, whose index conversion) depends on a boolean mask
MASK_INDEX_OPS = frozenset({"aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"})
#: Python-level reads that bypass the dispatcher for CPU tensors
PY_READS = ("tolist", "numpy", "__array__")


def _tensors(xs):
    for x in xs:
        if isinstance(x, torch.Tensor):
            yield x
        elif isinstance(x, (list, tuple)):
            yield from _tensors(x)


def _sync_reason(func, args, kwargs):
    name = func._schema.name
    if name in SYNC_OPS:
        return "reads device data on the host or has a data-dependent output shape"
    if name in MASK_INDEX_OPS and any(t.dtype in (torch.bool, torch.uint8) for t in _tensors(args[1:2])):
        return "indexes with a boolean mask (data-dependent shape)"
    if name == "aten::repeat_interleave" and kwargs.get("output_size") is None and isinstance(args[0], torch.Tensor) \
            and len(args) < 3:
        return "repeat_interleave without output_size (data-dependent shape)"
    if name == "aten::_to_copy" and kwargs.get("device") is not None and torch.device(kwargs["device"]).type == "cpu" \
            and args[0].device.type != "cpu":
        return "copies device data to the host"
    if name == "aten::copy_" and args[0].device.type == "cpu" and args[1].device.type != "cpu":
        return "copies device data to the host"
    return None


class NoHostSync(TorchDispatchMode):
    """Raises :class:`HostSyncError` on any op that would synchronise the host with the device
    (see :data:`SYNC_OPS`; a boolean-mask index; a copy to the host), and on the Python-level
    reads that skip the dispatcher (``tolist``, ``numpy``, ``__array__``). The kernels
    themselves (C++, CUDA) are not looked into: what is checked is every op the Python code,
    autograd and the fused edge's C++ host sequence (``adarts_C::edge_fwd``/``edge_bwd``,
    run with this mode on the stack) dispatch."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        why = _sync_reason(func, args, kwargs)
        if why is not None:
            raise HostSyncError(f"{func._schema.name}: {why}")
        if func._schema.name in ("adarts_C::edge_fwd", "adarts_C::edge_bwd"):
            self.host_sequences += 1
            TorchDispatchMode.__enter__(self)   # the ATen and adarts_C calls it issues pass through this mode too
            try:
                return func._op_dk(torch._C.DispatchKey.CompositeExplicitAutograd, *args, **kwargs)
            finally:
                TorchDispatchMode.__exit__(self, None, None, None)
        return func(*args, **kwargs)

    host_sequences = 0

    def __enter__(self):
        self._saved = {name: torch.Tensor.__dict__.get(name) for name in PY_READS}

        def refuse(name):
            def read(*a, **k):
                raise HostSyncError(f"Tensor.{name}: reads device data on the host")
            return read
        for name in PY_READS:
            setattr(torch.Tensor, name, refuse(name))
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            for name, old in self._saved.items():
                if old is None:
                    delattr(torch.Tensor, name)
                else:
                    setattr(torch.Tensor, name, old)


@pytest.mark.parametrize("case", ["item", "bool", "if", "float", "tolist", "numpy", "nonzero", "mask", "unique",
                                  "equal", "to_host_index"])
def test_the_detector_catches_every_kind_of_host_read(case):
    t = torch.tensor([1.0, 2.0, 3.0])
    run = {"item": lambda: t[0].item(), "bool": lambda: bool(t[0] > 0), "if": lambda: 1 if t[0] else 0,
           "float": lambda: float(t.sum()), "tolist": lambda: t.tolist(), "numpy": lambda: t.numpy(),
           "nonzero": lambda: t.nonzero(), "mask": lambda: t[t > 1], "unique": lambda: t.unique(),
           "equal": lambda: torch.equal(t, t), "to_host_index": lambda: range(int(t.argmax()))}[case]
    with pytest.raises(HostSyncError):
        with NoHostSync():
            run()
    assert t.tolist() == [1.0, 2.0, 3.0]          # the Python-level reads are back after the block


def test_the_detector_lets_device_side_work_through():
    t = torch.tensor([3.0, 1.0, 2.0])
    with NoHostSync():
        idx = torch.sort(t, descending=True, stable=True).indices[:2]
        torch._assert_async((idx >= 0).all())        # a device-side assert on a GPU
        out = t.index_select(0, idx) * 2 + torch.where(t > 1, t, torch.zeros_like(t)).sum()
        p = nn.Parameter(t.clone())
        p.grad = torch.ones_like(t)
        nn.utils.clip_grad_norm_([p], 1.0, foreach=True)
    assert out.shape == (2,)


# ----------------------------------------------------------------------------- tiny networks

def _supernet(kernels: str, recompute: str = "none") -> SearchNetwork:
    torch.manual_seed(0)
    return SearchNetwork(C=4, num_classes=10, layers=3, kernels=kernels, recompute=recompute).train()


def _search_parts(net: SearchNetwork):
    w = list(net.weight_parameters())
    return w, torch.optim.SGD(w, lr=0.05, momentum=0.9, weight_decay=3e-4), Architect(net, lr=0.01)


def _batch(gen: torch.Generator, n: int, size: int = 8):
    return torch.randn(n, 3, size, size, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def assert_same(a, b, where=""):
    """Bitwise equality of tensors (or None) in nested tuples / dicts."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype, where
        assert torch.equal(a, b), f"differ at {where}: max |diff| {(a.double() - b.double()).abs().max():.3g}"
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


#: (weight batch, architecture batch or None): two steps without an architecture batch (the
#: warm-up epochs: the weight graph alone), then both (everything captured again), a weight
#: batch of another size (folded last batch: eager), a short architecture batch (eager)
SEARCH_PLAN = [(4, None), (4, None), (4, 4), (4, 4), (6, 4), (4, 2), (4, 4)]


@pytest.mark.parametrize("kernels", ["modules", "fused"])
def test_graphed_search_steps_match_eager_steps(kernels):
    """A sequence of graphed search steps gives bitwise what the eager ``search_step`` gives
    on a copy: returned losses and logits, the network's parameters and buffers, both
    optimizers' states; two captures (weight graph, then both), two eager fallbacks."""
    net = _supernet(kernels)
    ref = copy.deepcopy(net)
    w, opt, arch = _search_parts(net)
    w_ref, opt_ref, arch_ref = _search_parts(ref)
    api = ReplayGraphAPI(guard=NoHostSync)
    graphed = GraphedSearchStep(net, arch, opt, w, graph_api=api)
    gen = torch.Generator().manual_seed(1)
    for i, (n, nv) in enumerate(SEARCH_PLAN):
        x, y = _batch(gen, n)
        xv, yv = _batch(gen, nv) if nv else (None, None)
        got = graphed(x, y, xv, yv, 0.05, 5.0)
        want = search_step(ref, arch_ref, opt_ref, w_ref, x, y, xv, yv, 0.05, 5.0)
        assert_same(got, want, f"step {i} outputs")
        assert_same(net.state_dict(), ref.state_dict(), f"step {i} state")
    assert_same(opt.state_dict(), opt_ref.state_dict(), "SGD state")
    assert_same(arch.state_dict(), arch_ref.state_dict(), "Adam state")
    assert graphed.captures == 2 and graphed.eager_steps == 2
    # the weight graph alone replayed twice, then the architecture and weight graphs three times each
    assert [g.replays for g in api.graphs] == [2, 3, 3]


@pytest.mark.parametrize("recompute", ["none", "edge"])
def test_graphed_fused_search_steps_on_the_gpu_code_paths(monkeypatch, recompute):
    """The same with the fused kernels' GPU code paths injected (indices checked by device
    asserts, NCHW operands) and channels_last static inputs, with edge recomputation too."""
    monkeypatch.setattr(_common, "on_host", lambda t: False)
    monkeypatch.setattr(units, "_channels_last_pays", lambda t: False)
    monkeypatch.setattr(units, "_flip_pays", lambda t: False)
    monkeypatch.setattr(units, "_merge_pays", lambda t, channels: False)
    net = _supernet("fused", recompute)
    ref = copy.deepcopy(net)
    w, opt, arch = _search_parts(net)
    w_ref, opt_ref, arch_ref = _search_parts(ref)
    graphed = GraphedSearchStep(net, arch, opt, w, channels_last=True, graph_api=ReplayGraphAPI(guard=NoHostSync))
    gen = torch.Generator().manual_seed(2)
    for i in range(3):
        x, y = _batch(gen, 4)
        xv, yv = _batch(gen, 4)
        got = graphed(x, y, xv, yv, 0.05, 5.0)
        want = search_step(ref, arch_ref, opt_ref, w_ref, x, y, xv, yv, 0.05, 5.0, channels_last=True)
        assert_same(got, want, f"step {i} outputs")
        assert_same(net.state_dict(), ref.state_dict(), f"step {i} state")
    assert graphed.parts["weight"].inputs[0].is_contiguous(memory_format=torch.channels_last)


def _eval_net() -> EvalNetwork:
    torch.manual_seed(0)
    return EvalNetwork(4, 10, 3, True, G.load("PC_DARTS"), image_size=8).train()


def test_graphed_retrain_steps_match_eager_steps():
    """Retrain steps (auxiliary head, label smoothing, drop-path): bitwise the eager
    ``retrain_step``'s, the graph captured again when the drop-path probability changes; a
    batch of another size runs eagerly. Each sequence runs from the same RNG state: the
    drop-path masks come from the global generator, which the warm-up and capture leave
    as they found it."""
    plan = [(0.0, 4), (0.0, 4), (0.2, 4), (0.2, 6), (0.2, 4), (0.3, 4)]
    gen = torch.Generator().manual_seed(3)
    batches = [_batch(gen, n) for _, n in plan]
    smooth = {"label_smoothing": 0.1}

    def run(graph_api):
        net = _eval_net()
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=3e-4)
        step = GraphedRetrainStep(net, opt, 0.4, 0.1, graph_api=graph_api) if graph_api is not None else None
        torch.manual_seed(11)
        outs, states = [], []
        for (prob, _), (x, y) in zip(plan, batches):
            net.drop_path_prob = prob
            outs.append(step(x, y, 5.0) if step is not None else retrain_step(net, opt, x, y, 5.0, 0.4, smooth))
            states.append(copy.deepcopy(net.state_dict()))
        return outs, states, opt.state_dict(), step

    api = ReplayGraphAPI(guard=NoHostSync)
    got, got_states, got_opt, step = run(api)
    want, want_states, want_opt, _ = run(None)
    assert_same(got, want, "outputs")
    assert_same(got_states, want_states, "states")
    assert_same(got_opt, want_opt, "SGD state")
    assert step.captures == 3 and step.eager_steps == 1
    assert [g.replays for g in api.graphs] == [2, 2, 1]


def test_graphed_steps_refuse_what_they_cannot_capture():
    net = _supernet("modules")
    w, opt, _ = _search_parts(net)
    api = ReplayGraphAPI()
    with pytest.raises(ValueError, match="first-order architecture step only"):
        GraphedSearchStep(net, Architect(net, unrolled=True), opt, w, graph_api=api)
    with pytest.raises(ValueError, match="data parallelism"):
        GraphedSearchStep(net, Architect(net, reduce=lambda ts: None), opt, w, graph_api=api)
    fused = _supernet("fused")
    fused.set_selector(D.GlobalSelector())
    fw, fopt, _ = _search_parts(fused)
    with pytest.raises(ValueError, match="global channel selection"):
        GraphedSearchStep(fused, Architect(fused), fopt, fw, graph_api=api)
    ddp = nn.parallel.DistributedDataParallel.__new__(nn.parallel.DistributedDataParallel)
    with pytest.raises(ValueError, match="DistributedDataParallel"):
        GraphedSearchStep(ddp, Architect(net), opt, w, graph_api=api)
    with pytest.raises(ValueError, match="must hold the network"):
        GraphedSearchStep(net, Architect(_supernet("modules")), opt, w, graph_api=api)
    with pytest.raises(ValueError, match="among the weights"):
        GraphedSearchStep(net, Architect(net), opt, w[1:], graph_api=api)
    with pytest.raises(ValueError, match="warmup must be at least 1"):
        GraphedSearchStep(net, Architect(net), opt, w, graph_api=api, warmup=0)
    step = GraphedSearchStep(net, Architect(net), opt, w, graph_api=api)
    x, y = _batch(torch.Generator().manual_seed(0), 4)
    with pytest.raises(ValueError, match="loss scales other than 1"):
        step(x, y, x, y, 0.05, 5.0, scale=0.5)
    ev = _eval_net()
    with pytest.raises(ValueError, match="parameter of the network"):
        GraphedRetrainStep(ev, torch.optim.SGD(net.parameters(), lr=0.1), graph_api=api)
    with pytest.raises(ValueError, match="loss scales other than 1"):
        GraphedRetrainStep(ev, torch.optim.SGD(ev.parameters(), lr=0.1), graph_api=api)(x, y, 5.0, scale=2.0)


def test_the_default_graph_api_is_torch_cuda(monkeypatch):
    """The default API's attributes are torch.cuda's; its capture (the lines the stand-in runs
    too) opens ``graph(g, pool=pool)`` on a new ``CUDAGraph`` around the body."""
    api = graphs.default_graph_api()
    assert type(api) is CudaGraphAPI
    for name in ("CUDAGraph", "graph", "graph_pool_handle", "Stream", "stream", "current_stream", "device",
                 "synchronize", "empty_cache", "get_rng_state", "set_rng_state"):
        assert getattr(api, name) is getattr(torch.cuda, name), name
    seen = []

    class Graph:
        pass

    def graph(g, pool=None, capture_error_mode="global"):
        seen.append((type(g), pool, capture_error_mode))
        return NoHostSync()
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    g, out = CudaGraphAPI().capture(lambda: (torch.ones(2) * 3,), pool="pool")
    assert isinstance(g, Graph) and seen == [(Graph, "pool", "thread_local")]
    assert torch.equal(out[0], torch.full((2,), 3.0))
    with pytest.raises(HostSyncError):                # the body runs inside the capture context
        CudaGraphAPI().capture(lambda: (torch.ones(2).sum().item(),), pool=None)


# ----------------------------------------------------------------------------- the loops and the drivers

TINY = dict(dataset="digits", image_size=8, limit=32, C=4, layers=3, batch_size=12, epochs=2, progress=False,
            device="cpu")


@pytest.fixture
def stand_in(monkeypatch):
    """The loops' graphed steps on the CPU stand-in: the device refusal lifted, the default
    graph API replaced; returns the API (its graphs count their replays)."""
    api = ReplayGraphAPI(guard=NoHostSync)
    monkeypatch.setattr(search_loop, "check_cuda_graphs", lambda cfg, device: None)
    monkeypatch.setattr(retrain_loop, "check_cuda_graphs", lambda cfg, device: None)
    monkeypatch.setattr(graphs, "default_graph_api", lambda: api)
    return api


def _records(out):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in read_jsonl(Path(out) / "log.jsonl")
            if r.get("kind") != "header"]


def test_a_search_with_cuda_graphs_is_the_eager_search(tmp_path, stand_in):
    """run_search with ``cuda_graphs``: 32 + 32 images, batch 12 (a last batch of 8 runs
    eagerly), one warm-up epoch (the weight graph alone), then both graphs: the same log
    records, weights, optimizer states and genotype as the eager run; the choice is in the
    checkpoint's config and the log's header."""
    eager = run_search(SearchConfig(out=str(tmp_path / "eager"), warmup_epochs=1, **TINY))
    graphed = run_search(SearchConfig(out=str(tmp_path / "graphed"), warmup_epochs=1, cuda_graphs=True, **TINY))
    assert graphed["genotype"] == eager["genotype"]
    assert _records(tmp_path / "graphed") == _records(tmp_path / "eager")
    a, b = (load_checkpoint(str(tmp_path / r / "checkpoint.pt")) for r in ("eager", "graphed"))
    for key in ("model", "w_opt", "a_opt"):
        assert_same(b[key], a[key], key)
    assert b["config"]["cuda_graphs"] is True and a["config"]["cuda_graphs"] is False
    assert read_jsonl(tmp_path / "graphed" / "log.jsonl")[0]["cuda_graphs"] is True
    assert [g.replays for g in stand_in.graphs] == [2, 2, 2]      # steps 1-2 of each epoch; step 3 eager


def test_a_retrain_with_cuda_graphs_is_the_eager_retrain(tmp_path, stand_in):
    """run_retrain with ``cuda_graphs``: auxiliary head, drop-path ramped over 2 epochs (the
    graph captured again for the second), batch 12 with a last batch of 8 (eager): the same
    records, weights and optimizer state as the eager run; a graphed run resumes eagerly."""
    kw = dict(TINY, genotype="PC_DARTS", auxiliary=True, drop_path=0.2, cutout=0)
    eager = run_retrain(RetrainConfig(out=str(tmp_path / "eager"), **kw))
    graphed = run_retrain(RetrainConfig(out=str(tmp_path / "graphed"), cuda_graphs=True, **kw))
    assert graphed["test_acc"] == eager["test_acc"] and graphed["test_loss"] == eager["test_loss"]
    assert _records(tmp_path / "graphed") == _records(tmp_path / "eager")
    a, b = (load_checkpoint(str(tmp_path / r / "checkpoint.pt")) for r in ("eager", "graphed"))
    assert_same(b["model"], a["model"], "model")
    assert_same(b["opt"], a["opt"], "opt")
    assert b["config"]["cuda_graphs"] is True
    assert [g.replays for g in stand_in.graphs] == [2, 2]
    # the flag changes no number: resuming a graphed run without it is no changed setting
    resumed = run_retrain(RetrainConfig(out=str(tmp_path / "graphed"), resume=True, **kw))
    assert resumed["test_acc"] == eager["test_acc"]


SEARCH_ARGS = ["--limit", "32", "--C", "4", "--layers", "3", "--batch-size", "16", "--epochs", "1",
               "--warmup-epochs", "0", "--no-progress"]
RETRAIN_ARGS = ["--limit", "32", "--C", "4", "--layers", "3", "--batch-size", "16", "--epochs", "1", "--no-progress",
                "--genotype", "PC_DARTS"]


@pytest.fixture
def no_data(monkeypatch):
    """Loading data fails the test: a refusal must come before it."""
    from adarts_kernels.nas import loop_common

    def load(cfg):
        raise AssertionError("data was loaded before the bad input was refused")
    monkeypatch.setattr(loop_common, "_load", load)


def _one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.mark.parametrize("name, args, message", [
    ("search", ["--device", "cpu"], "--cuda-graphs captures the step into CUDA graphs and needs a CUDA device, got cpu"),
    ("search", ["--device", "cpu", "--unrolled"], "--cuda-graphs captures the first-order architecture step only"),
    ("search", ["--device", "cpu", "--batch-size", "auto"], "--cuda-graphs with --batch-size auto"),
    ("retrain", ["--device", "cpu"], "--cuda-graphs captures the step into CUDA graphs and needs a CUDA device"),
], ids=["search-cpu", "search-unrolled", "search-batch-auto", "retrain-cpu"])
def test_the_drivers_refuse_cuda_graphs_in_one_line(name, args, message, tmp_path, no_data, capsys):
    out = tmp_path / "run"
    cmd, base = (search_cmd, SEARCH_ARGS) if name == "search" else (retrain_cmd, RETRAIN_ARGS)
    rc = cmd.main(base + ["--cuda-graphs", "--out", str(out)] + args)
    line = _one_error_line(capsys)
    assert rc == 2 and message in line, line
    assert not out.exists()           # refused before the run directory was made


@pytest.mark.skipif(torch.cuda.is_available(), reason="--device auto picks the GPU here")
def test_cuda_graphs_on_a_machine_without_a_gpu_is_refused(tmp_path, no_data, capsys):
    assert search_cmd.main(SEARCH_ARGS + ["--cuda-graphs", "--out", str(tmp_path / "run")]) == 2
    assert "needs a CUDA device, got cpu" in _one_error_line(capsys)


def test_cuda_graphs_are_refused_under_torchrun(monkeypatch):
    """Under torchrun (even one process: DDP and the global selection run there) the check
    refuses before any device question; on a GPU alone it passes."""
    cfg = SearchConfig(cuda_graphs=True)
    check_cuda_graphs(cfg, torch.device("cuda"))
    check_cuda_graphs(SearchConfig(), torch.device("cpu"))           # off: nothing to check
    for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match="cannot run under torchrun"):
        check_cuda_graphs(cfg, torch.device("cuda"))
    with pytest.raises(ValueError, match="cannot run under torchrun"):
        check_cuda_graphs(RetrainConfig(cuda_graphs=True), torch.device("cuda"))


def test_the_flags_reach_the_configs():
    p = search_cmd.build_parser()
    assert p.parse_args(["--cuda-graphs"]).cuda_graphs and not p.parse_args([]).cuda_graphs
    assert retrain_cmd.build_parser().parse_args(["--cuda-graphs"]).cuda_graphs
    assert SearchConfig().cuda_graphs is False and RetrainConfig().cuda_graphs is False


# ----------------------------------------------------------------------------- no host sync in a search step

def _sync_free_halves(net: SearchNetwork, gen: torch.Generator) -> int:
    """Both halves of a search step, the forward and backward of each under the detector
    (the architecture gradient as Architect.step computes it; the weight step with its
    gradient clipping); the optimizer steps outside it. Returns how many fused-edge host
    sequences (adarts_C::edge_fwd/edge_bwd) the detector looked into."""
    w, opt, arch = _search_parts(net)
    x, y = _batch(gen, 4)
    xv, yv = _batch(gen, 4)
    first, second = NoHostSync(), NoHostSync()
    with first:
        vloss = net.loss(xv, yv)
        grads = torch.autograd.grad(vloss, arch.model.arch_parameters())
    for p, g in zip(arch.model.arch_parameters(), grads):
        p.grad = g
    arch.optimizer.step()
    opt.zero_grad(set_to_none=True)
    with second:
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        nn.utils.clip_grad_norm_(w, 5.0, foreach=True)
    opt.step()
    return first.host_sequences + second.host_sequences


@pytest.mark.parametrize("recompute", ["none", "edge"])
def test_a_fused_search_step_makes_no_host_sync(monkeypatch, recompute):
    """Both halves of a fused supernet's search step, forward and backward, with the GPU
    code paths injected (``on_host`` -> False: indices checked by device-side asserts;
    ``_channels_last_pays`` -> False: NCHW operands), make no op that reads device data on
    the host or has a data-dependent shape. The optimizer steps run outside the detector:
    on CPU tensors Adam's and SGD's step counts are host-side values, read by design. Then a
    planted ``.item()`` in the classifier's forward is caught: the test fails when a sync
    appears."""
    monkeypatch.setattr(_common, "on_host", lambda t: False)
    monkeypatch.setattr(units, "_channels_last_pays", lambda t: False)
    monkeypatch.setattr(units, "_flip_pays", lambda t: False)
    monkeypatch.setattr(units, "_merge_pays", lambda t, channels: False)
    net = _supernet("fused", recompute)
    gen = torch.Generator().manual_seed(4)
    # every edge forward and backward, both halves: the C++ host sequences were looked into
    assert _sync_free_halves(net, gen) >= 4 * sum(1 for _ in net.selecting_edges())
    forward = net.classifier.forward
    monkeypatch.setattr(net.classifier, "forward", lambda t: forward(t) + 0 * t.sum().item())
    with pytest.raises(HostSyncError, match="_local_scalar_dense"):
        _sync_free_halves(net, gen)


# ----------------------------------------------------------------------------- torch.compile

def _compiled_step_inputs():
    torch.manual_seed(0)
    net = SearchNetwork(C=4, num_classes=10, layers=3, steps=1, multiplier=1, kernels="fused").train()
    gen = torch.Generator().manual_seed(5)
    return net, _batch(gen, 4), _batch(gen, 4)


def _search_step_with(net, loss_fn, x, y, xv, yv):
    """One full search step whose two losses are ``loss_fn``: the Architect's first-order step
    (``net.loss`` replaced), then the weight step with clipping; returns what to compare."""
    net.loss = loss_fn
    w, opt, arch = _search_parts(net)
    vloss = arch.step(x, y, xv, yv)
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(x, y)
    loss.backward()
    nn.utils.clip_grad_norm_(w, 5.0, foreach=True)
    grads = [p.grad.clone() for p in w]
    opt.step()
    return vloss.detach(), loss.detach(), grads, {k: v.clone() for k, v in net.state_dict().items()}


def test_the_fused_supernet_loss_compiles_fullgraph():
    """``torch.compile(SearchNetwork.loss, fullgraph=True)`` of the fused supernet (no graph
    break: the fused edge runs its composed ``adarts::`` custom ops under tracing, each with
    a fake), then one full search step (architecture + weight step) with the compiled loss
    against the eager one, within float32 tolerance: both losses, the clipped weight
    gradients, and the parameters and BatchNorm buffers after both optimizer steps.

    The smallest supernet the model allows (C=4, 3 cells, one node per cell:
    ``steps=1, multiplier=1``, 2 edges a cell), 8x8, batch 4, backend ``aot_eager`` (Dynamo
    and AOT autograd: the tracing that fullgraph is about; no code generation). Measured on
    one CPU thread, 2026-12-07: compile (forward and backward) 12 s, the whole test 14 s;
    with the model's default 4-node cells the ``aot_eager`` compile alone took 58 s, hence
    this configuration. The default inductor backend (C++ code generation on CPU) is the
    opt-in variant below, ``ADARTS_COMPILE_INDUCTOR=1``: 66 s with an empty inductor cache,
    15 s with a warm one.
    """
    _compile_and_compare("aot_eager")


@pytest.mark.skipif(os.environ.get("ADARTS_COMPILE_INDUCTOR") != "1",
                    reason="inductor compile: about 80 s on one CPU thread; ADARTS_COMPILE_INDUCTOR=1")
def test_the_fused_supernet_loss_compiles_fullgraph_with_inductor():
    _compile_and_compare("inductor")


def _compile_and_compare(backend: str) -> None:
    torch._dynamo.reset()
    try:
        net, (x, y), (xv, yv) = _compiled_step_inputs()
        ref = copy.deepcopy(net)
        compiled = torch.compile(net.loss, fullgraph=True, backend=backend)
        t0 = time.perf_counter()
        compiled(xv, yv).backward()       # compile, forward and backward, before the step
        print(f"\ntorch.compile(fullgraph=True, backend={backend!r}) of the loss: {time.perf_counter() - t0:.1f} s")
        net.load_state_dict(ref.state_dict())         # the BatchNorm statistics that forward moved
        got = _search_step_with(net, compiled, x, y, xv, yv)
        want = _search_step_with(ref, ref.loss, x, y, xv, yv)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    finally:
        torch._dynamo.reset()


# ----------------------------------------------------------------------------- the benchmark

def test_the_graphs_benchmark_runs_dry_on_cpu(tmp_path, capsys):
    """benchmarks/graphs_step.py --dry-run: the script's code path at a tiny configuration
    with the stand-in graph API; without --dry-run a CPU is refused."""
    bench = REPO / "benchmarks"
    sys.path.insert(0, str(bench))
    try:
        import graphs_step
    finally:
        sys.path.remove(str(bench))
    out = tmp_path / "g" / "graphs.json"
    assert graphs_step.main(["--dry-run", "--reps", "1", "--variants", "adarts-fused", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["meta"]["dry_run"] is True
    (row,) = doc["rows"]
    assert row["variant"] == "adarts-fused" and row["batch"] == 4 and row["captures"] == 1
    assert row["eager_ms"] > 0 and row["graphed_ms"] > 0 and row["eager_peak_mb"] is None
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            graphs_step.main(["--out", str(tmp_path / "x.json")])
        assert "CUDA graphs need a CUDA device" in capsys.readouterr().err
