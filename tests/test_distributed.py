"""Data parallelism on CPU with gloo: two processes per case, started here with torchrun's
environment (``tests/dist_worker.py``), or by torchrun itself for the drivers.

(a) every edge selects the same channels on both ranks, the channels one process selects
    from the concatenated batch; (b) after search epochs alpha, beta, weights and BatchNorm
    buffers are identical on both ranks; (c) a 2-rank step equals the one-process
    computation it claims to be: each rank's shard loss with the channels selected from the
    score summed over both shards, gradients averaged -- i.e. the mean of the two half-batch
    losses, each half with its own BatchNorm batch statistics, the selection global; first
    and second order; (d) resume from a 2-rank checkpoint on 1 process and the reverse;
    (e) a killed or hung rank ends the job with a clear error, the checkpoint intact.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from adarts_kernels import distributed as D
from adarts_kernels.nas import loops
from adarts_kernels.nas.architect import Architect
from adarts_kernels.nas.config import SearchConfig
from adarts_kernels.nn.selection import select_channels
from adarts_kernels.utils.io import load_checkpoint, read_jsonl

sys.path.insert(0, str(Path(__file__).parent))
import dist_worker as W  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).parent / "dist_worker.py"

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(rank: int, world: int, port: int) -> dict:
    env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
               LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT))
    return env


def _start(argv, world: int = 2):
    port = _free_port()
    return [subprocess.Popen([sys.executable, *argv], env=_env(r, world, port), cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True) for r in range(world)]


def _wait(procs, timeout: float = 300):
    outs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outs.append(out)
    return outs


def spawn(scenario: str, tmp: Path, world: int = 2, **kw):
    """Run ``scenario`` on ``world`` ranks; each rank's saved result."""
    tmp.mkdir(parents=True, exist_ok=True)
    procs = _start([str(WORKER), scenario, str(tmp), *(f"{k}={v}" for k, v in kw.items())], world)
    outs = _wait(procs)
    for p, out in zip(procs, outs):
        assert p.returncode == 0, f"a rank failed (exit {p.returncode}):\n{out[-4000:]}"
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(world)]


# ----------------------------------------------------------------------------- (a)

@pytest.mark.parametrize("kernels,impl", [("fused", "cpp"), ("fused", "reference"), ("modules", "reference")])
def test_a_selection_is_global_and_equals_one_process(tmp_path, kernels, impl):
    if impl == "cpp":
        from adarts_kernels import _ext
        if not _ext.HAS_EXT:
            pytest.skip("the C++ extension is not built")
    r0, r1 = spawn("select", tmp_path, kernels=kernels, impl=impl)
    model = W.small_model(kernels, impl).eval()
    with torch.no_grad():
        model(W.batches()[0])              # one process, the whole (concatenated) batch
    one = {n: e.last_idx for n, e in model.selecting_edges()}
    assert len(one) == 3 * 14 and set(r0["idx"]) == set(one)
    for name, idx in one.items():
        assert torch.equal(r0["idx"][name], r1["idx"][name]), name
        assert torch.equal(r0["idx"][name], idx), name


def test_a_selection_triton_backend(tmp_path):
    pytest.importorskip("triton")
    r0, r1 = spawn("select", tmp_path, kernels="fused", impl="triton", layers=1)
    model = W.small_model("fused", "triton", layers=1).eval()
    with torch.no_grad():
        model(W.batches()[0])
    for name, e in model.selecting_edges():
        assert torch.equal(r0["idx"][name], r1["idx"][name]) and torch.equal(r0["idx"][name], e.last_idx), name


# ----------------------------------------------------------------------------- (c)

class _Forced:
    """One process: the k-th global forward of an edge runs as two half-batch forwards, both
    with the channels the ranks chose at their k-th forward; records each half's score."""

    def __init__(self, idx):
        self.idx, self.calls, self.scores = idx, 0, []

    def __call__(self, score, n):
        k = self.calls // 2
        self.calls += 1
        self.scores.append(score.detach().clone())
        return self.idx[k]


class _Halves:
    """What the Architect sees in the one-process computation: the loss is the mean of the
    two half-batch losses."""

    def __init__(self, model):
        self.model = model

    def loss(self, x, y):
        h = x.shape[0] // 2
        return 0.5 * (self.model.loss(x[:h], y[:h]) + self.model.loss(x[h:], y[h:]))

    def arch_parameters(self):
        return self.model.arch_parameters()

    def weight_parameters(self):
        return self.model.weight_parameters()

    def buffers(self):
        return self.model.buffers()


@pytest.mark.parametrize("unrolled,recompute,kernels", [("0", "none", "fused"), ("1", "none", "fused"),
                                                        ("0", "edge", "fused"), ("0", "none", "modules")])
def test_c_two_rank_step_is_the_mean_of_half_batch_losses(tmp_path, unrolled, recompute, kernels):
    impl = "reference"
    r0, r1 = spawn("step", tmp_path, kernels=kernels, impl=impl, unrolled=unrolled, recompute=recompute)
    for name in r0["params"]:
        assert torch.equal(r0["params"][name], r1["params"][name]), f"{name} differs between the ranks"
    for name in r0["idx"]:
        for a, b in zip(r0["idx"][name], r1["idx"][name]):
            assert torch.equal(a, b), name

    # the one-process computation, with the ranks' channel choices replayed
    model = W.small_model(kernels, impl, recompute)
    forced = {}
    for name, edge in model.selecting_edges():
        forced[name] = _Forced(r0["idx"][name])
        edge.selector = forced[name]
    architect = Architect(_Halves(model), 6e-4, (0.5, 0.999), 1e-3, unrolled=unrolled == "1")
    weights = list(model.weight_parameters())
    w_opt = torch.optim.SGD(weights, lr=0.05, momentum=0.9, weight_decay=3e-4)
    x, y, xv, yv = W.batches()
    h = W.B // 2
    for _ in range(len(r0["losses"])):
        architect.step(x, y, xv, yv, eta=0.05, weight_optimizer=w_opt)
        w_opt.zero_grad(set_to_none=True)
        loss = 0.5 * (F.cross_entropy(model(x[:h]), y[:h]) + F.cross_entropy(model(x[h:]), y[h:]))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(weights, 5.0, foreach=True)
        w_opt.step()

    # the replayed channels are the top-k of the score summed over the two halves ...
    for name, f in forced.items():
        assert f.calls == 2 * len(r0["idx"][name]) and f.calls > 0, name
        for k, idx in enumerate(r0["idx"][name]):
            total = f.scores[2 * k] + f.scores[2 * k + 1]
            assert torch.equal(select_channels(total, idx.numel()), idx), f"{name}, forward {k}"
            # ... and each rank saw its half's score
            torch.testing.assert_close(r0["scores"][name][k], f.scores[2 * k], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(r1["scores"][name][k], f.scores[2 * k + 1], rtol=1e-5, atol=1e-6)
    # ... and the parameters after the steps are the one-process ones
    for name, p in model.named_parameters():
        torch.testing.assert_close(r0["params"][name], p.detach(), rtol=0, atol=1e-5, msg=name)
    moved = [n for n, p in model.named_parameters() if n.startswith("alphas")
             and not torch.equal(p.detach(), W.small_model(kernels, impl, recompute).state_dict()[n])]
    assert moved, "the architecture step did not move alpha"


# ----------------------------------------------------------------------------- (b), drift

def test_b_search_keeps_ranks_identical(tmp_path):
    run = tmp_path / "run"
    r0, r1 = spawn("search", tmp_path, run=run, epochs=2, warmup=1, check_every=1)
    assert r0["error"] is None and r1["error"] is None
    assert r0["record"] == r1["record"]
    assert set(r0["state"]) == set(r1["state"])
    for name in r0["state"]:
        assert torch.equal(r0["state"][name], r1["state"][name]), f"{name} differs between the ranks"
    ckpt = load_checkpoint(run / "checkpoint.pt")
    for name, t in ckpt["model"].items():
        assert torch.equal(t, r0["state"][name]), name
    log = read_jsonl(run / "log.jsonl")
    assert log[0]["kind"] == "header" and log[0]["world_size"] == 2 and log[0]["backend"] == "gloo"
    assert [r["world_size"] for r in log[1:]] == [2, 2]
    assert (run / "genotype.json").exists()


def test_b_search_darts_second_order(tmp_path):
    r0, r1 = spawn("search", tmp_path, run=tmp_path / "run", epochs=1, warmup=0, edge="darts", unrolled=1,
                   check_every=1)
    assert r0["error"] is None
    for name in r0["state"]:
        assert torch.equal(r0["state"][name], r1["state"][name]), name


def test_drift_guard_names_the_tensor(tmp_path):
    r0, r1 = spawn("search", tmp_path, run=tmp_path / "run", epochs=1, warmup=0, check_every=2, perturb_at=3)
    for r in (r0, r1):
        assert r["error"] is not None and "classifier.weight" in r["error"] and "step 4" in r["error"], r["error"]
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


# ----------------------------------------------------------------------------- (d)

def _search_cfg(run, **kw):
    base = dict(dataset="digits", out=str(run), limit=96, batch_size=16, epochs=3, warmup_epochs=1, image_size=8,
                C=8, layers=3, progress=False, device="cpu")
    base.update(kw)
    return SearchConfig(**base)


def test_d_resume_two_ranks_on_one_and_back(tmp_path):
    # 2 ranks, interrupted after epoch 1 ...
    run = tmp_path / "run"
    r0, _ = spawn("search", tmp_path / "a", run=run, epochs=3, stop_after=0)
    assert r0["stopped"]
    first = load_checkpoint(run / "checkpoint.pt")
    assert first["epoch"] == 0 and first["history"][0]["world_size"] == 2
    # ... resumed by one process: it starts from the 2-rank state and finishes
    seen = []
    result = loops.run_search(_search_cfg(run, resume=True), on_epoch_end=lambda e, r: seen.append(e))
    assert seen == [1, 2] and result["epochs"] == 3
    done = load_checkpoint(run / "checkpoint.pt")
    assert done["epoch"] == 2 and done["history"][0] == first["history"][0]
    assert "world_size" not in done["history"][1]
    assert [r["epoch"] for r in read_jsonl(run / "log.jsonl")[1:]] == [1, 2, 3]

    # the reverse: one process interrupted after epoch 1, resumed on 2 ranks
    run2 = tmp_path / "run2"
    with pytest.raises(W.Stop):
        loops.run_search(_search_cfg(run2), on_epoch_end=lambda e, r: (_ for _ in ()).throw(W.Stop()))
    single = load_checkpoint(run2 / "checkpoint.pt")
    r0, r1 = spawn("search", tmp_path / "b", run=run2, epochs=3, resume=1)
    assert not r0["stopped"] and r0["error"] is None
    for name in r0["state"]:
        assert torch.equal(r0["state"][name], r1["state"][name]), name
    done = load_checkpoint(run2 / "checkpoint.pt")
    assert done["epoch"] == 2 and done["history"][0] == single["history"][0]
    assert [r.get("world_size") for r in done["history"]] == [None, 2, 2]


def test_d_two_rank_resume_is_exact(tmp_path):
    """2 ranks interrupted after epoch 1 and resumed on 2 ranks end bitwise where an
    uninterrupted 2-rank run ends."""
    straight = spawn("search", tmp_path / "a", run=tmp_path / "straight", epochs=2)
    spawn("search", tmp_path / "b", run=tmp_path / "cut", epochs=2, stop_after=0)
    resumed = spawn("search", tmp_path / "c", run=tmp_path / "cut", epochs=2, resume=1)
    for name in straight[0]["state"]:
        assert torch.equal(straight[0]["state"][name], resumed[0]["state"][name]), name


# ----------------------------------------------------------------------------- (e)

def _driver(run, timeout: int, epochs: int = 200):
    return [str(ROOT / "python" / "search.py"), "--dataset", "digits", "--limit", "96", "--batch-size", "16",
            "--epochs", str(epochs), "--warmup-epochs", "0", "--C", "8", "--layers", "3", "--no-progress",
            "--device", "cpu", "--out", str(run), "--dist-timeout", str(timeout)]


def _wait_for(path: Path, procs, limit: float = 180):
    t0 = time.time()
    while not path.exists():
        if any(p.poll() is not None for p in procs) or time.time() - t0 > limit:
            outs = [p.communicate(timeout=30)[0] if p.poll() is not None else "(running)" for p in procs]
            for p in procs:
                p.kill()
            pytest.fail(f"{path} never appeared:\n" + "\n".join(o[-3000:] for o in outs))
        time.sleep(0.2)


@pytest.mark.parametrize("how", ["kill", "hang"])
def test_e_a_dead_or_hung_rank_ends_the_job(tmp_path, how):
    run = tmp_path / "run"
    timeout = 10
    procs = _start(_driver(run, timeout))
    try:
        _wait_for(run / "checkpoint.pt", procs)
        t0 = time.time()
        os.kill(procs[1].pid, signal.SIGKILL if how == "kill" else signal.SIGSTOP)
        out, _ = procs[0].communicate(timeout=timeout + 120)
        took = time.time() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert procs[0].returncode == 2, out[-3000:]
    assert "rank 0 of 2" in out and "lost contact with the other ranks" in out, out[-3000:]
    assert took < timeout + 30, f"rank 0 took {took:.0f} s to stop with a {timeout} s collective timeout"
    ckpt = load_checkpoint(run / "checkpoint.pt")          # intact: the sha256 footer checks it
    assert ckpt["kind"] == "search" and ckpt["epoch"] >= 0


# ----------------------------------------------------------------------------- torchrun, drivers

def _torchrun(args, n=2, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", *args]
    return subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=timeout)


def test_torchrun_search_then_retrain(tmp_path):
    s = tmp_path / "search"
    p = _torchrun(["python/search.py", "--dataset", "digits", "--limit", "64", "--batch-size", "16", "--epochs", "1",
                   "--warmup-epochs", "0", "--C", "8", "--layers", "3", "--no-progress", "--out", str(s)])
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert p.stdout.count("genotype written to") == 1     # rank 0 alone prints
    header = read_jsonl(s / "log.jsonl")[0]
    assert header["world_size"] == 2 and (s / "genotype.json").exists() and (s / "cells.png").exists()
    r = tmp_path / "retrain"
    p = _torchrun(["python/retrain.py", "--dataset", "digits", "--genotype", str(s / "genotype.json"), "--limit", "64",
                   "--batch-size", "16", "--epochs", "1", "--C", "8", "--layers", "3", "--no-progress",
                   "--out", str(r)])
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    result = json.loads((r / "result.json").read_text())
    assert 0.0 <= result["test_acc"] <= 100.0 and p.stdout.count("test accuracy") == 1
    assert read_jsonl(r / "log.jsonl")[-1]["world_size"] == 2


def test_torchrun_refuses_a_batch_that_does_not_divide(tmp_path):
    p = _torchrun(["python/search.py", "--dataset", "digits", "--limit", "64", "--batch-size", "15", "--epochs", "1",
                   "--no-progress", "--out", str(tmp_path / "s")], timeout=120)
    assert p.returncode != 0
    assert "--batch-size 15 is the global batch and must divide by the 2 ranks" in p.stderr, p.stderr[-3000:]


# ----------------------------------------------------------------------------- pieces, one process

def test_shard_bounds_match_tensor_split():
    for b in range(0, 13):
        for world in range(1, 6):
            parts = torch.tensor_split(torch.arange(b), world)
            for r in range(world):
                lo, hi = D.shard_bounds(b, r, world)
                assert torch.equal(torch.arange(b)[lo:hi], parts[r])


def test_check_global_batch():
    assert D.check_global_batch(64, 4) == 16
    with pytest.raises(ValueError, match="use 63 or 66"):
        D.check_global_batch(64, 3)


def test_checksum_sees_any_change():
    t = torch.randn(5, 7)
    base = D.checksum(t)
    for i in range(t.numel()):
        u = t.clone().view(-1)
        u[i] = torch.nextafter(u[i], torch.tensor(float("inf")))
        assert not torch.equal(D.checksum(u.view(5, 7)), base)
    swapped = t.clone().view(-1)
    swapped[[0, 1]] = swapped[[1, 0]]
    assert not torch.equal(D.checksum(swapped), base)
    for dt in (torch.float64, torch.bfloat16, torch.float16, torch.int64):
        assert torch.equal(D.checksum(t.to(dt)), D.checksum(t.to(dt).clone()))


def test_single_process_is_unchanged_without_torchrun(monkeypatch):
    for k in D.TORCHRUN_ENV:
        monkeypatch.delenv(k, raising=False)
    ctx, dev = D.setup("cpu")
    assert ctx is D.SINGLE and dev is None and not ctx.active
    assert D.explain_failure(RuntimeError("x")) == "x"


def test_a_failure_on_one_rank_at_start_stops_every_rank(tmp_path):
    """Rank 0 cannot take the run directory (another run holds it): rank 1 does not wait
    for it until the timeout, both stop at once."""
    from adarts_kernels.nas.checkpoint import lock_run
    run = tmp_path / "run"
    with lock_run(str(run)):
        t0 = time.time()
        procs = _start([str(WORKER), "search", str(tmp_path), f"run={run}", "epochs=1", "timeout=100"])
        outs = _wait(procs, timeout=90)
    assert time.time() - t0 < 60
    assert all(p.returncode != 0 for p in procs)
    assert "is in use by another run" in outs[0], outs[0][-2000:]
    assert "another rank failed during the start" in outs[1], outs[1][-2000:]


def test_global_selector_is_trusted_other_selectors_are_checked(monkeypatch):
    """The fused edge skips the idx value check for a trusted selector (a sort's prefix) and
    keeps it for any other, on its one-node path and on the composed ops' path alike."""
    import adarts_kernels.nn.fused as fused
    from adarts_kernels.nn import fused_function as FF
    seen = []
    real_op, real_kernel = fused.attention_gather, FF.gather_fwd_kernel

    def spy_op(*a, validate_idx=True, **k):
        seen.append(validate_idx)
        return real_op(*a, validate_idx=validate_idx, **k)

    def spy_kernel(x, a, idx, impl, validate_idx=True):
        seen.append(validate_idx)
        return real_kernel(x, a, idx, impl, validate_idx)
    monkeypatch.setattr(fused, "attention_gather", spy_op)
    monkeypatch.setattr(FF, "gather_fwd_kernel", spy_kernel)
    for one_node in (True, False):
        seen.clear()
        edge = fused.FusedAttentionMixedOp(8, 1, 4, impl="reference")
        edge.one_node = one_node
        x, w = torch.randn(2, 8, 4, 4), torch.softmax(torch.randn(8), 0)

        class Trusted:
            trusted = True

            def __call__(self, score, n):
                return select_channels(score, n)
        edge.selector = Trusted()
        out_trusted = edge(x, w)
        edge.selector = select_channels           # a plain function: checked
        out_checked = edge(x, w)
        edge.selector = None                      # the op's own idx: not checked
        out_own = edge(x, w)
        assert seen == [False, True, False], one_node
        assert torch.equal(out_trusted, out_own) and torch.equal(out_checked, out_own)
    assert D.GlobalSelector.trusted is True


def _readme_torchrun_lines():
    text = (ROOT / "README.md").read_text()
    sec = text[text.index("## Several GPUs or machines"):]
    sec = sec[:sec.index("\n## ", 5)]
    block = sec[sec.index("```bash"):]
    block = block[:block.index("```", 7)].replace("\\\n", " ")
    return [line.strip() for line in block.splitlines() if line.strip().startswith("torchrun ")]


def test_readme_torchrun_commands_parse():
    """Every torchrun command of the README parses: torchrun's own options and the driver's."""
    import shlex

    from torch.distributed.run import get_args_parser

    from adarts_kernels.commands import retrain, search
    lines = _readme_torchrun_lines()
    assert len(lines) == 4
    for line in lines:
        argv = shlex.split(line.replace("~/data", "/data"))[1:]
        args = get_args_parser().parse_args(argv)
        script, rest = args.training_script, args.training_script_args
        parser = {"python/search.py": search, "python/retrain.py": retrain}[script].build_parser()
        parser.parse_args(rest)


def test_readme_cpu_torchrun_command_runs(tmp_path):
    """The README's CPU command, as written (plus an output directory and no bars)."""
    import shlex
    line = next(cmd for cmd in _readme_torchrun_lines() if "--dataset digits" in cmd)
    argv = shlex.split(line)[1:] + ["--out", str(tmp_path / "run"), "--no-progress"]
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", *argv], cwd=ROOT, capture_output=True,
                       text=True, timeout=600, env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert (tmp_path / "run" / "genotype.json").exists()
    assert read_jsonl(tmp_path / "run" / "log.jsonl")[0]["world_size"] == 2


def test_a_non_finite_loss_on_one_rank_stops_every_rank(tmp_path):
    """The non-finite flag is combined over the ranks at each read: the rank that saw the NaN
    and the one that did not stop at the same point (no rank left waiting), nothing written."""
    r0, r1 = spawn("search", tmp_path, run=tmp_path / "run", epochs=1, warmup=0, nan_at=2)
    for r in (r0, r1):
        assert r["error"] is not None and "non-finite train loss at epoch 1, step 2" in r["error"], r["error"]
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_batch_size_auto_takes_the_smallest_rank(tmp_path):
    """``--batch-size auto`` under data parallelism: every rank probes its own device (here a
    probe that runs out of memory above 40 on rank 0 and above 24 on rank 1); the smallest
    fit is kept, the global batch is the ranks times 90% of it (rounded to 8), the lr
    scaled on the global batch; rank 0 writes auto_batch.json."""
    run = tmp_path / "run"
    r0, r1 = spawn("search", tmp_path, run=run, epochs=1, warmup=0, auto_caps="40,24")
    assert r0["error"] is None and r0["record"] == r1["record"]
    auto = json.loads((run / "auto_batch.json").read_text())
    assert auto["max_fit"] == 24 and auto["per_rank"] == 16 and auto["world_size"] == 2 and auto["batch_size"] == 32
    assert auto["lr"] == pytest.approx(0.05 * 32 / 64)
    assert read_jsonl(run / "log.jsonl")[1]["batch_size"] == 32


def test_two_machines_through_the_c10d_rendezvous(tmp_path):
    """The README's several-machines form, on one host: two torchrun agents (``--nnodes=2``,
    one process each) meeting at a c10d rendezvous endpoint, as two machines would."""
    port = _free_port()
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=two-machines", "python/search.py", "--dataset", "digits",
           "--limit", "64", "--batch-size", "16", "--epochs", "1", "--warmup-epochs", "0", "--C", "8", "--layers", "3",
           "--no-progress", "--out", str(run)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    agents = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
              for _ in range(2)]
    outs = _wait(agents, timeout=300)
    for a, out in zip(agents, outs):
        assert a.returncode == 0, out[-3000:]
    header = read_jsonl(run / "log.jsonl")[0]
    assert header["world_size"] == 2 and (run / "genotype.json").exists()
    assert sum(out.count("genotype written to") for out in outs) == 1


def test_sharded_evaluation_is_the_one_process_evaluation(tmp_path):
    """9 images in batches of 4 on 2 ranks: two batches sharded (global selection), the last
    (1 image, fewer than ranks) evaluated whole by every rank and counted once; the loss and
    accuracy are those of one process."""
    from adarts_kernels.data.loader import BatchLoader
    r0, r1 = spawn("evaluate", tmp_path)
    assert r0["result"] == r1["result"]
    model = W.small_model("fused", "reference")
    one = loops.evaluate(model, BatchLoader(W.eval_set(9), 4, shuffle=False, augment=False))
    assert r0["result"][1] == one[1]
    assert r0["result"][0] == pytest.approx(one[0], rel=1e-6)
