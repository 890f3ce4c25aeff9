"""One rank of the data-parallel tests (``tests/test_distributed.py`` starts two of these with
torchrun's environment: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).

    python tests/dist_worker.py SCENARIO OUT_DIR [key=value ...]

Each scenario writes ``OUT_DIR/rank<r>.pt`` with what the test compares.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from adarts_kernels import distributed as D  # noqa: E402
from adarts_kernels.nas import loops, search_loop  # noqa: E402
from adarts_kernels.nas.architect import Architect  # noqa: E402
from adarts_kernels.nas.config import SearchConfig  # noqa: E402
from adarts_kernels.nas.search_model import SearchNetwork  # noqa: E402

B = 8           # global batch of the step scenarios


def batches(seed: int = 1, size: int = 16, classes: int = 10):
    """The global batches every rank (and the one-process reference) start from."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 3, size, size, generator=g)
    y = torch.randint(0, classes, (B,), generator=g)
    xv = torch.randn(B, 3, size, size, generator=g)
    yv = torch.randint(0, classes, (B,), generator=g)
    return x, y, xv, yv


def small_model(kernels: str = "fused", impl: str = "cpp", recompute: str = "none", layers: int = 3,
                edge: str = "adarts") -> SearchNetwork:
    torch.manual_seed(0)
    return SearchNetwork(8, 10, layers, edge=edge, k=4, kernels=kernels, impl=impl if kernels == "fused" else None,
                         recompute=recompute)


class Recording:
    """Wraps a selector; keeps every call's local score and the idx it returned."""

    def __init__(self, inner):
        self.inner, self.scores, self.idx = inner, [], []

    def __call__(self, score, n):
        idx = self.inner(score, n)
        self.scores.append(score.detach().clone())
        self.idx.append(idx.clone())
        return idx


def select(ctx, out, kernels="fused", impl="cpp", layers="3"):
    """(a): eval-mode forward of this rank's shard with the global selection; every edge's idx."""
    model = small_model(kernels, impl, layers=int(layers)).eval()
    model.set_selector(D.GlobalSelector())
    x = batches()[0]
    lo, hi = D.shard_bounds(B, ctx.rank, ctx.world_size)
    with torch.no_grad():
        model(x[lo:hi])
    torch.save({"idx": {n: e.last_idx.clone() for n, e in model.selecting_edges()}}, out)


def step(ctx, out, kernels="fused", impl="cpp", unrolled="0", recompute="none", steps="2"):
    """(c): search steps (architecture + weights) on this rank's shards; the selections made
    (local score and idx of every call of every edge) and the parameters after."""
    model = small_model(kernels, impl, recompute)
    recs = {}
    for name, edge in model.selecting_edges():
        recs[name] = Recording(D.GlobalSelector())
        edge.selector = recs[name]
    architect = Architect(model, 6e-4, (0.5, 0.999), 1e-3, unrolled=unrolled == "1",
                          reduce=lambda ts: D.average_(ts, "arch_grads"))
    weights = list(model.weight_parameters())
    w_opt = torch.optim.SGD(weights, lr=0.05, momentum=0.9, weight_decay=3e-4)
    net = D.wrap_ddp(model, torch.device("cpu"), ignore=model.arch_parameter_names())
    x, y, xv, yv = batches()
    lo, hi = D.shard_bounds(B, ctx.rank, ctx.world_size)
    losses = []
    for _ in range(int(steps)):
        loss, _, vloss = loops.search_step(net, architect, w_opt, weights, x[lo:hi], y[lo:hi], xv[lo:hi],
                                           yv[lo:hi], 0.05, 5.0)
        losses.append((float(loss), float(vloss)))
    torch.save({"params": {n: p.detach().clone() for n, p in model.named_parameters()},
                "scores": {n: r.scores for n, r in recs.items()}, "idx": {n: r.idx for n, r in recs.items()},
                "losses": losses}, out)


def _capture_model(monkey_box):
    made = search_loop._search_model

    def grab(*a, **k):
        m = made(*a, **k)
        monkey_box.append(m)
        return m
    search_loop._search_model = grab


class Stop(Exception):
    pass


def search(ctx, out, run=None, epochs="2", warmup="1", stop_after="-1", check_every="1", edge="adarts",
           unrolled="0", resume="0", perturb_at="-1", kernels="auto", nan_at="-1", auto_caps=""):
    """(b), (d): the real search loop (digits, small); this rank's final model state."""
    box = []
    _capture_model(box)
    if int(perturb_at) >= 0 and ctx.rank == 1:       # a silent divergence on rank 1 only
        real_step, calls = search_loop.search_step, [0]

        def drifting_step(model, *a, **k):
            calls[0] += 1
            if calls[0] == int(perturb_at):
                with torch.no_grad():
                    model.module.classifier.weight[0, 0] += 1e-3
            return real_step(model, *a, **k)
        search_loop.search_step = drifting_step

    if int(nan_at) >= 0 and ctx.rank == 1:           # a non-finite loss on rank 1 only
        real_step2, calls2 = search_loop.search_step, [0]

        def nan_step(*a, **k):
            calls2[0] += 1
            loss, logits, vloss = real_step2(*a, **k)
            return (loss * float("nan") if calls2[0] == int(nan_at) else loss), logits, vloss
        search_loop.search_step = nan_step

    def hook(epoch, rec):
        if epoch == int(stop_after):
            raise Stop()
    trial = None
    if auto_caps:                                   # --batch-size auto, each rank's device fits its cap
        cap = int(auto_caps.split(",")[ctx.rank])

        def trial(b):
            if b > cap:
                raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {b} MiB")
    cfg = SearchConfig(dataset="digits", out=run, edge=edge, kernels=kernels, limit=96,
                       batch_size="auto" if auto_caps else 16,
                       epochs=int(epochs), warmup_epochs=int(warmup), image_size=8, C=8, layers=3,
                       check_every=int(check_every), unrolled=unrolled == "1", resume=resume == "1",
                       progress=False, device="cpu")
    result = {"stopped": False, "error": None}
    try:
        result["record"] = loops.run_search(cfg, on_epoch_end=hook, batch_trial=trial)
    except Stop:
        result["stopped"] = True
    except (D.DriftError, loops.NonFiniteError) as e:
        result["error"] = str(e)
    model = box[0]
    result["state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save(result, out)


def evaluate(ctx, out, n="9", batch="4"):
    """Sharded evaluation of a small supernet over a set whose last batch has fewer images
    than ranks (evaluated whole on every rank, counted once)."""
    from adarts_kernels.data.loader import BatchLoader
    model = small_model("fused", "reference")
    model.set_selector(D.GlobalSelector())
    torch.save({"result": loops.evaluate(model, BatchLoader(eval_set(int(n)), int(batch), shuffle=False,
                                                            augment=False), ctx=ctx)}, out)


def eval_set(n: int):
    from adarts_kernels.data.loader import ImageSet
    g = torch.Generator().manual_seed(3)
    return ImageSet(torch.randint(0, 256, (n, 3, 16, 16), generator=g, dtype=torch.uint8),
                    torch.randint(0, 10, (n,), generator=g), 10, (0.5,) * 3, (0.25,) * 3, "random")


SCENARIOS = {"select": select, "step": step, "search": search, "evaluate": evaluate}


def main():
    scenario, out_dir, *pairs = sys.argv[1:]
    kw = dict(p.split("=", 1) for p in pairs)
    ctx, _ = D.setup("cpu", timeout_s=float(kw.pop("timeout", 120)))
    try:
        SCENARIOS[scenario](ctx, os.path.join(out_dir, f"rank{ctx.rank}.pt"), **kw)
    finally:
        D.teardown(ctx)


if __name__ == "__main__":
    main()
