"""CUDA-graph capture of the search step and of the retrain step (``--cuda-graphs``).

At CIFAR batch sizes a search step on a GPU is expected to be bound by the host (Python,
dispatch and autograd bookkeeping for thousands of small kernels; not measured here).
Replaying a captured CUDA graph launches them all at once. :class:`GraphedSearchStep` and :class:`GraphedRetrainStep`
follow PyTorch's whole-network capture pattern:

- static input buffers (``x, y`` and, for the architecture step, ``xv, yv``) are allocated
  once, outside the graphs; every call copies its batch into them;
- the forward and backward are warmed up on a side stream (:data:`WARMUP` times), then
  captured into graphs that share one memory pool;
- the gradients are outputs of the captured backward: allocated in the graph pool, rewritten
  by every replay, and handed to the parameters' ``.grad`` after it;
- the optimizer steps (Adam for alpha and beta; gradient-norm clipping and SGD for the
  weights) run eagerly after the replays, as in the eager step, so the learning rate
  schedule, weight decay and momentum need nothing captured.

What is captured: the first-order architecture step's forward and backward (the validation
loss and its gradient with respect to the architecture parameters, as
:meth:`~adarts_kernels.nas.architect.Architect.step` computes them) and the weight step's
forward and backward (the training loss and its gradient with respect to the weights). The
graphed search step returns what :func:`~adarts_kernels.nas.search_loop.search_step` returns
(``loss, logits, arch_loss``, as new tensors) and leaves the network, both optimizers and the
BatchNorm running statistics as the eager step does. Two differences, neither read by the
loops: the weight step computes no gradient for alpha and beta (the eager step's backward
adds the training loss's gradient to their ``.grad``, which the next architecture step
discards), and between two steps the parameters' ``.grad`` are the graphs' outputs, which
the next step's replays overwrite.

Refused: the second-order (``unrolled``) architecture step (its finite-difference Hessian
product restores weights and buffers around three extra passes) and data parallelism
(``DistributedDataParallel``'s all-reduce, the architect's gradient averaging and the global
channel selection are collectives, not captured here).

Batches of another shape (the last, smaller batch of an epoch, or a last batch that the
loader folded into the one before it) run the eager step instead: a graph replays the shapes
it was captured with. That eager step allocates its own memory while the graph pool stays
reserved, so an odd-sized batch needs up to its own eager step's memory on top of the
graphs'. ``--batch-size auto`` probes eager steps and does not measure that; the drivers
refuse it with ``--cuda-graphs``.

Memory: nothing in the graph pool is read after the step that wrote it: the replays'
outputs (losses, logits, gradients) are consumed by the optimizer steps and copied out
before the next replay, so the two graphs may share the pool whatever order they replay in (a step without an
architecture batch replays the weight graph alone). Parameters, buffers, optimizer states
and the static inputs live outside it. When the set of graphs a step needs grows (the first
step after the warm-up epochs needs the architecture graph too) or, in the retrain, the
drop-path probability changes (a Python float baked into the graph at capture: once an
epoch), the graphs are released and everything is captured again.

The graph calls go through a ``graph_api`` object (:class:`CudaGraphAPI`, torch.cuda's, by
default); :class:`ReplayGraphAPI` is a stand-in whose capture records the body and whose
replay re-runs it, which runs every line here without a GPU (``tests/test_capture.py``,
``benchmarks/graphs_step.py --dry-run``). Tested on CPU with that stand-in only; not yet
measured on a GPU.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import distributed as D
from .architect import Architect

__all__ = ["CudaGraphAPI", "GraphedRetrainStep", "GraphedSearchStep", "ReplayGraphAPI", "WARMUP",
           "default_graph_api"]

#: eager runs of every captured body on a side stream before the capture (lazy
#: initialisation, cuBLAS/cuDNN workspaces, autotuning happen there, not inside a capture)
WARMUP = 3


class CudaGraphAPI:
    """The graph calls of the captured steps: torch.cuda's. Attributes: ``CUDAGraph``,
    ``graph`` (the capture context), ``graph_pool_handle``, ``Stream``, ``stream`` (context),
    ``current_stream``, ``device`` (context), ``synchronize``, ``empty_cache``,
    ``get_rng_state``, ``set_rng_state``; :meth:`capture` is built on ``CUDAGraph`` and
    ``graph``."""

    def __init__(self):
        cuda = torch.cuda
        self.CUDAGraph = cuda.CUDAGraph
        self.graph = cuda.graph
        self.graph_pool_handle = cuda.graph_pool_handle
        self.Stream = cuda.Stream
        self.stream = cuda.stream
        self.current_stream = cuda.current_stream
        self.device = cuda.device
        self.synchronize = cuda.synchronize
        self.empty_cache = cuda.empty_cache
        self.get_rng_state = cuda.get_rng_state
        self.set_rng_state = cuda.set_rng_state

    def capture(self, body: Callable[[], tuple], pool) -> Tuple[object, tuple]:
        """``(graph, outputs)``: ``body()`` captured into a new graph allocating from ``pool``;
        ``outputs`` are the static tensors every replay rewrites. Only this thread's calls are
        checked during the capture (``thread_local``): a data loader's pinning thread may
        allocate page-locked memory meanwhile, which the default ``global`` mode refuses."""
        g = self.CUDAGraph()
        with self.graph(g, pool=pool, capture_error_mode="thread_local"):
            out = body()
        return g, out


def default_graph_api() -> CudaGraphAPI:
    """The ``graph_api`` of a step built without one: torch.cuda's."""
    return CudaGraphAPI()


def _copy_into(static, new) -> None:
    """Copy the tensors of ``new`` into those of ``static`` (same nesting; ``None`` where unused)."""
    if isinstance(static, torch.Tensor):
        static.copy_(new)
    elif isinstance(static, (tuple, list)):
        for s, n in zip(static, new):
            _copy_into(s, n)
    elif static is not None or new is not None:
        raise TypeError(f"a captured body returned {type(new).__name__} where its capture returned "
                        f"{type(static).__name__}")


class ReplayGraph:
    """The graph of :class:`ReplayGraphAPI`: ``replay()`` re-runs the captured body and copies
    its results into the static outputs, as a CUDA graph's replay rewrites them in place."""

    def __init__(self):
        self.body: Optional[Callable[[], tuple]] = None
        self.out: tuple = ()
        self.guard: Callable = contextlib.nullcontext
        self.replays = 0

    def replay(self) -> None:
        with self.guard():
            new = self.body()
        _copy_into(self.out, new)
        self.replays += 1


class _HostStream:
    def wait_stream(self, other) -> None:
        pass


class ReplayGraphAPI(CudaGraphAPI):
    """A stand-in for torch.cuda's graph calls that runs anywhere (CPU tests, dry runs):
    :meth:`capture` runs the body once through the base class's ``CUDAGraph``/``graph`` lines,
    keeps it, and its graph's replay re-runs it. Streams, the device context, synchronisation
    and the cache are no-ops; the RNG state is the CPU generator's.

    ``guard``: a context factory entered around every capture and replay; tests pass a
    host-synchronisation detector (a real capture fails on a host synchronisation)."""

    def __init__(self, guard: Optional[Callable] = None):     # nothing of torch.cuda
        self.guard = guard if guard is not None else contextlib.nullcontext
        self.graphs: List[ReplayGraph] = []
        self.CUDAGraph = ReplayGraph
        self.graph = lambda g, pool=None, capture_error_mode="global": self.guard()
        self.graph_pool_handle = object
        self.Stream = self.current_stream = _HostStream
        self.stream = self.device = lambda _: contextlib.nullcontext()
        self.synchronize = self.empty_cache = lambda: None
        self.get_rng_state, self.set_rng_state = torch.get_rng_state, torch.set_rng_state

    def capture(self, body: Callable[[], tuple], pool) -> Tuple[ReplayGraph, tuple]:
        g, out = super().capture(body, pool)
        g.body, g.out, g.guard = body, out, self.guard
        self.graphs.append(g)
        return g, out


def _same_layout(t: torch.Tensor, s: torch.Tensor) -> bool:
    return t.shape == s.shape and t.dtype == s.dtype and t.device == s.device


def _set_grads(params: Sequence[torch.Tensor], grads: Sequence[Optional[torch.Tensor]]) -> None:
    for p, g in zip(params, grads):
        p.grad = g


class _Part:
    """One captured body: its static inputs (allocated outside the graph pool), its graph
    and its static outputs."""

    def __init__(self, inputs: Tuple[torch.Tensor, ...]):
        self.inputs = inputs
        self.graph = None
        self.out: tuple = ()

    def fits(self, *batch: torch.Tensor) -> bool:
        return all(_same_layout(t, s) for t, s in zip(batch, self.inputs))

    def load(self, *batch: torch.Tensor) -> None:
        for s, t in zip(self.inputs, batch):
            s.copy_(t, non_blocking=True)


class _Graphed:
    """What both graphed steps share: the parts, their capture and release."""

    def __init__(self, model: nn.Module, graph_api, warmup: int):
        if isinstance(model, nn.parallel.DistributedDataParallel):
            raise ValueError("CUDA graphs capture a one-process step: data parallelism (DistributedDataParallel) "
                             "is not supported; run without torchrun, or without --cuda-graphs")
        if warmup < 1:
            raise ValueError(f"warmup must be at least 1 (eager runs before the capture), got {warmup}")
        self.model = model
        self.api = graph_api if graph_api is not None else default_graph_api()
        self.warmup = warmup
        self.device = next(model.parameters()).device
        self.parts: Dict[str, _Part] = {}
        #: how many times the graphs were captured, and how many steps ran eagerly (another shape)
        self.captures = 0
        self.eager_steps = 0

    def _grad_params(self) -> List[torch.Tensor]:
        raise NotImplementedError

    def _release(self) -> None:
        """Drop the graphs and their outputs (the ``.grad`` pointing into the pool included);
        the static inputs are kept by the caller."""
        if self.parts:
            self.api.synchronize()
        for p in self._grad_params():
            p.grad = None
        self.parts = {}
        self.api.empty_cache()

    def _static(self, *batch: torch.Tensor, channels_last: bool = False) -> Tuple[torch.Tensor, ...]:
        """Static copies of ``batch`` (images in channels_last when asked), outside the pool."""
        out = []
        for t in batch:
            fmt = torch.channels_last if channels_last and t.dim() == 4 else torch.contiguous_format
            s = torch.empty_like(t, memory_format=fmt)
            s.copy_(t)
            out.append(s)
        return tuple(out)

    def _capture(self, inputs: Dict[str, Tuple[torch.Tensor, ...]], bodies: Dict[str, Callable[[], tuple]]) -> None:
        """Warm ``bodies`` up on a side stream, then capture each (in order, one shared pool).
        The BatchNorm running statistics and the RNG state are as before the warm-up."""
        self.parts = {name: _Part(inputs[name]) for name in bodies}
        buffers = list(self.model.buffers())
        with torch.no_grad():
            saved = [b.clone() for b in buffers]
        rng = self.api.get_rng_state()
        side = self.api.Stream()
        side.wait_stream(self.api.current_stream())
        with self.api.stream(side):
            for _ in range(self.warmup):
                for body in bodies.values():
                    body()
        self.api.current_stream().wait_stream(side)
        self.api.empty_cache()      # the warm-up's cached blocks back to the device, for the pool
        pool = self.api.graph_pool_handle()
        for name, body in bodies.items():
            self.parts[name].graph, self.parts[name].out = self.api.capture(body, pool)
        with torch.no_grad():
            for b, s in zip(buffers, saved):
                b.copy_(s)
        self.api.set_rng_state(rng)
        self.captures += 1


class GraphedSearchStep(_Graphed):
    """The search step (:func:`~adarts_kernels.nas.search_loop.search_step`) replayed from CUDA
    graphs; see the module docstring for what is captured and what is refused.

    ``model``: the bare :class:`~adarts_kernels.nas.search_model.SearchNetwork` (in training
    mode); ``architect``: its first-order :class:`Architect` (no ``reduce``); ``w_opt``: the
    weight optimizer, over ``weights``; ``channels_last``: the images' static buffers are
    channels_last (``search_step``'s ``channels_last``). ``graph_api``: see
    :class:`CudaGraphAPI` (``None``: torch.cuda's). The graphs are captured at the first call,
    for its batch shapes (the architecture graph at the first call with an architecture batch).

    ``step(x, y, xv, yv, lr, grad_clip)`` returns ``(loss, logits, arch_loss)`` as
    ``search_step`` does; ``lr`` is used by the second-order step only, accepted for the
    same signature.
    """

    def __init__(self, model: nn.Module, architect: Architect, w_opt: torch.optim.Optimizer,
                 weights: Sequence[torch.Tensor], channels_last: bool = False, graph_api=None,
                 warmup: int = WARMUP):
        super().__init__(model, graph_api, warmup)
        if architect.unrolled:
            raise ValueError("CUDA graphs capture the first-order architecture step only; the second-order "
                             "(unrolled) step is not supported: drop --unrolled or --cuda-graphs")
        if architect.reduce is not None or any(isinstance(getattr(e, "selector", None), D.GlobalSelector)
                                               for _, e in getattr(model, "selecting_edges", lambda: ())()):
            raise ValueError("CUDA graphs capture a one-process step: data parallelism (gradient averaging, "
                             "global channel selection) is not supported; run without torchrun")
        if architect.model is not model:
            raise ValueError("the architect must hold the network the step is captured for")
        self.architect, self.w_opt, self.channels_last = architect, w_opt, channels_last
        self.weights = list(weights)
        held = {id(p) for p in self.weights}
        if any(id(p) not in held for group in w_opt.param_groups for p in group["params"]):
            raise ValueError("every parameter of the weight optimizer must be among the weights")
        self.arch = list(architect.model.arch_parameters())

    def _grad_params(self) -> List[torch.Tensor]:
        return self.arch + self.weights

    # -- the captured bodies ------------------------------------------------------------
    def _arch_body(self) -> tuple:
        """The first-order architecture gradient, as Architect.step computes it."""
        xv, yv = self.parts["arch"].inputs
        loss = self.model.loss(xv, yv)
        return loss.detach(), torch.autograd.grad(loss, self.arch)

    def _weight_body(self) -> tuple:
        """The weight step's forward and backward, as search_step computes them."""
        x, y = self.parts["weight"].inputs
        logits = self.model(x)
        loss = F.cross_entropy(logits, y)
        return loss.detach(), logits.detach(), torch.autograd.grad(loss, self.weights, allow_unused=True)

    def _build(self, x, y, xv, yv) -> None:
        """(Re)capture the graphs this call needs, keeping the static inputs already made."""
        inputs = {name: part.inputs for name, part in self.parts.items()}
        self._release()
        if xv is not None and "arch" not in inputs:
            inputs["arch"] = self._static(xv, yv, channels_last=self.channels_last)
        if "weight" not in inputs:
            inputs["weight"] = self._static(x, y, channels_last=self.channels_last)
        bodies = {name: getattr(self, f"_{name}_body") for name in ("arch", "weight") if name in inputs}
        self._capture(inputs, bodies)

    # -- a step ---------------------------------------------------------------------------
    def step(self, x: torch.Tensor, y: torch.Tensor, xv: Optional[torch.Tensor] = None,
             yv: Optional[torch.Tensor] = None, lr: float = 0.0, grad_clip: float = 5.0,
             scale: float = 1.0, arch_scale: float = 1.0):
        if scale != 1.0 or arch_scale != 1.0:
            raise ValueError("CUDA graphs capture a one-process step: loss scales other than 1 (data "
                             "parallelism) are not supported")
        with self.api.device(self.device):
            if "weight" not in self.parts or (xv is not None and "arch" not in self.parts):
                self._build(x, y, xv, yv)
            if not (self.parts["weight"].fits(x, y) and (xv is None or self.parts["arch"].fits(xv, yv))):
                from .search_loop import search_step
                self.eager_steps += 1
                return search_step(self.model, self.architect, self.w_opt, self.weights, x, y, xv, yv, lr,
                                   grad_clip, self.channels_last)
            vloss = None
            if xv is not None:
                part = self.parts["arch"]
                part.load(xv, yv)
                part.graph.replay()
                static_vloss, grads = part.out
                _set_grads(self.arch, grads)
                self.architect.optimizer.step()
                vloss = static_vloss.clone()
            part = self.parts["weight"]
            part.load(x, y)
            part.graph.replay()
            static_loss, static_logits, grads = part.out
            _set_grads(self.weights, grads)
            nn.utils.clip_grad_norm_(self.weights, grad_clip, foreach=True)
            self.w_opt.step()
            return static_loss.clone(), static_logits.clone(), vloss

    __call__ = step


class GraphedRetrainStep(_Graphed):
    """The retrain step (:func:`~adarts_kernels.nas.retrain_loop.retrain_step`: forward, the
    loss with the auxiliary head's if the network has one, backward, gradient-norm clipping,
    the optimizer step) replayed from a CUDA graph.

    ``model``: the :class:`~adarts_kernels.nas.eval_model.EvalNetwork` (or NetworkImageNet)
    in training mode; ``opt`` steps its parameters; ``auxiliary_weight`` and
    ``label_smoothing`` as in the retrain loop. The drop-path probability
    (``model.drop_path_prob``) is read at capture; when it changes the graph is captured
    again. The drop-path masks are drawn inside the graph from the device's generator (on a
    GPU each replay draws fresh ones).

    ``step(x, y, grad_clip)`` returns ``(loss, logits)``.
    """

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, auxiliary_weight: float = 0.4,
                 label_smoothing: float = 0.0, graph_api=None, warmup: int = WARMUP):
        super().__init__(model, graph_api, warmup)
        self.opt, self.auxiliary_weight = opt, auxiliary_weight
        self.smooth = {"label_smoothing": label_smoothing} if label_smoothing else {}
        self.params = list(model.parameters())
        held = {id(p) for p in self.params}
        if any(id(p) not in held for group in opt.param_groups for p in group["params"]):
            raise ValueError("every parameter of the optimizer must be a parameter of the network")
        self._drop_prob: Optional[float] = None

    def _grad_params(self) -> List[torch.Tensor]:
        return self.params

    def _train_body(self) -> tuple:
        from .retrain_loop import retrain_loss
        x, y = self.parts["train"].inputs
        loss, logits = retrain_loss(self.model, x, y, self.auxiliary_weight, self.smooth)
        return loss.detach(), logits.detach(), torch.autograd.grad(loss, self.params, allow_unused=True)

    def step(self, x: torch.Tensor, y: torch.Tensor, grad_clip: float = 5.0, scale: float = 1.0):
        if scale != 1.0:
            raise ValueError("CUDA graphs capture a one-process step: loss scales other than 1 (data "
                             "parallelism) are not supported")
        with self.api.device(self.device):
            prob = float(getattr(self.model, "drop_path_prob", 0.0))
            if "train" not in self.parts or prob != self._drop_prob:
                inputs = {name: part.inputs for name, part in self.parts.items()}
                self._release()
                if "train" not in inputs:
                    inputs["train"] = self._static(x, y)
                self._capture(inputs, {"train": self._train_body})
                self._drop_prob = prob
            part = self.parts["train"]
            if not part.fits(x, y):
                from .retrain_loop import retrain_step
                self.eager_steps += 1
                return retrain_step(self.model, self.opt, x, y, grad_clip, self.auxiliary_weight, self.smooth)
            part.load(x, y)
            part.graph.replay()
            static_loss, static_logits, grads = part.out
            _set_grads(self.params, grads)
            nn.utils.clip_grad_norm_(self.params, grad_clip)
            self.opt.step()
            return static_loss.clone(), static_logits.clone()

    __call__ = step
