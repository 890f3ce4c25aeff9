"""The CUDA-only lines of the package, run on CPU with the device check answering "CUDA"
(``torch.cuda.is_available`` or the module's own device check replaced, the CUDA calls
recorded). The driver loop's probe is covered in test_train.py
(``test_step_pair_trial_runs_real_steps_on_a_copy``), the backend report in test_backend.py;
the benchmarks' CUDA timing lines say at the line that benchmarks/device_suite.sh runs them."""
import pytest
import torch

from adarts_kernels.data import loader as loader_mod
from adarts_kernels.data.loader import BatchLoader, ImageSet
from adarts_kernels.nas import checkpoint
from adarts_kernels.nas.config import resolve_device
from adarts_kernels.profiling import is_oom, max_batch


def fake_cuda(monkeypatch, calls, **fns):
    """torch.cuda.is_available() -> True; each torch.cuda.<name> in fns replaced, recording calls."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name, ret in fns.items():
        def f(*args, _name=name, _ret=ret, **kwargs):
            calls.append((_name, args))
            return _ret
        monkeypatch.setattr(torch.cuda, name, f)


def test_release_empties_the_cuda_cache(monkeypatch):
    calls = []
    fake_cuda(monkeypatch, calls, empty_cache=None)
    max_batch._release()
    assert calls == [("empty_cache", ())]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    max_batch._release()
    assert calls == [("empty_cache", ())]          # not called without CUDA


def test_find_max_batch_releases_after_each_oom(monkeypatch):
    calls = []
    fake_cuda(monkeypatch, calls, empty_cache=None)

    def trial(b):
        if b > 40:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    best, tried = max_batch.find_max_batch(trial, start=16, limit=128, granularity=8)
    assert best == 40
    assert len(calls) >= sum(1 for _, ok in tried if not ok) > 0


def test_is_oom_knows_the_cuda_class():
    assert is_oom(torch.cuda.OutOfMemoryError("anything"))
    assert is_oom(RuntimeError("CUDA out of memory"))
    assert not is_oom(RuntimeError("invalid argument"))


def test_rng_state_saves_and_restores_the_cuda_generators(monkeypatch):
    calls = []
    cuda_states = [torch.arange(4, dtype=torch.uint8)]
    fake_cuda(monkeypatch, calls, get_rng_state_all=cuda_states, set_rng_state_all=None)
    state = checkpoint.rng_state()
    assert state["cuda"] is cuda_states and torch.equal(state["torch"], torch.get_rng_state())
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    saved = checkpoint.rng_state()
    torch.rand(5)
    checkpoint.set_rng_state(saved)
    assert torch.equal(torch.rand(3), expected)
    assert calls == [("get_rng_state_all", ()), ("get_rng_state_all", ()), ("set_rng_state_all", (cuda_states,))]


def test_rng_state_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    state = checkpoint.rng_state()
    assert set(state) == {"torch"}
    checkpoint.set_rng_state({**state, "cuda": [torch.zeros(1, dtype=torch.uint8)]})   # a GPU checkpoint on CPU


def test_resolve_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(RuntimeError, match="sees no CUDA device"):
        resolve_device("cuda")


@pytest.mark.parametrize("cuda", [False, True], ids=["cpu", "cuda-branch"])
def test_loader_copies_asynchronously_on_cuda(monkeypatch, cuda):
    """With the loader's device check answering "CUDA", every batch is copied with
    non_blocking=True (on CPU a plain copy), the batches unchanged."""
    g = torch.Generator().manual_seed(1)
    ds = ImageSet(torch.randint(0, 256, (10, 3, 6, 6), dtype=torch.uint8, generator=g), torch.arange(10), 10,
                  (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "toy")
    plain = [(x.clone(), y.clone()) for x, y in BatchLoader(ds, 4, shuffle=True, augment=True, seed=2)]
    seen = []
    real_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        seen.append(kwargs.get("non_blocking", False))
        return real_to(self, *args, **kwargs)
    monkeypatch.setattr(loader_mod, "_is_cuda", lambda device: cuda)
    monkeypatch.setattr(torch.Tensor, "to", to)
    got = [(x.clone(), y.clone()) for x, y in BatchLoader(ds, 4, shuffle=True, augment=True, seed=2)]
    monkeypatch.undo()
    assert len(got) == len(plain) == 3
    for (x0, y0), (x1, y1) in zip(plain, got):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)
    copies = [nb for nb in seen if nb]
    assert len(copies) == (2 * len(got) if cuda else 0)
    assert loader_mod._is_cuda(torch.device("cuda")) and not loader_mod._is_cuda(torch.device("cpu"))


def test_idx_check_device_path_on_cpu(monkeypatch):
    """The GPU branch of check_idx_values (async device asserts, no host read) with the device
    check injected: a good idx passes, an out-of-range or repeated one trips the assert."""
    from adarts_kernels.ops import _common
    monkeypatch.setattr(_common, "on_host", lambda t: False)
    _common.check_idx_values("attention_gather", torch.tensor([3, 0, 2]), 4)
    for bad, words in ((torch.tensor([0, 4]), r"in \[0, 4\)"), (torch.tensor([1, 1]), "distinct")):
        with pytest.raises(RuntimeError, match=words):
            _common.check_idx_values("attention_gather", bad, 4)


def test_fused_edge_gpu_layout_on_cpu(monkeypatch):
    """The fused units' GPU layout (NCHW, no channels_last) computes the reference edge."""
    import torch.nn.functional as F

    from adarts_kernels import FusedAttentionMixedOp
    from adarts_kernels.nn import AttentionMixedOp, units
    calls = []
    monkeypatch.setattr(units, "_channels_last_pays", lambda t: calls.append(t.shape) or False)
    for stride in (1, 2):
        torch.manual_seed(stride)
        ref, fused = AttentionMixedOp(8, stride, 4), FusedAttentionMixedOp(8, stride, 4, impl="reference")
        fused.load_state_dict(ref.state_dict())
        xs = [torch.randn(3, 8, 6, 6, generator=torch.Generator().manual_seed(7)).requires_grad_() for _ in range(2)]
        w = F.softmax(torch.randn(8), 0)
        out, expect = fused(xs[0], w), ref(xs[1], w)
        torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)
        out.sum().backward(), expect.sum().backward()
        torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-4, atol=1e-5)
    assert calls                      # the injected check was consulted


def _torchrun_env(monkeypatch, rank=1, world=2, local=1, local_world=2):
    for k, v in (("RANK", rank), ("WORLD_SIZE", world), ("LOCAL_RANK", local), ("LOCAL_WORLD_SIZE", local_world)):
        monkeypatch.setenv(k, str(v))


def test_distributed_device_choice_with_gpus(monkeypatch):
    from adarts_kernels import distributed as D
    calls = []
    fake_cuda(monkeypatch, calls, device_count=2)
    _torchrun_env(monkeypatch)
    assert D._device_for("auto", 1) == torch.device("cuda:1")
    assert D._device_for("cuda", 1) == torch.device("cuda:1")
    assert D._device_for("cpu", 1) == torch.device("cpu")
    with pytest.raises(ValueError, match="would put them all on one GPU"):
        D._device_for("cuda:0", 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert D._device_for("cuda:1", 0) == torch.device("cuda:1")
    with pytest.raises(RuntimeError, match="this machine has 2 GPUs"):
        D._device_for("cuda", 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert D._device_for("auto", 1) == torch.device("cpu")
    with pytest.raises(RuntimeError, match="sees no CUDA device"):
        D._device_for("cuda", 0)


def test_distributed_setup_on_a_gpu_uses_nccl(monkeypatch):
    """setup()'s GPU lines: the device set, NCCL with the device id and the timeout."""
    import datetime

    from adarts_kernels import distributed as D
    calls = []
    fake_cuda(monkeypatch, calls, device_count=2, set_device=None)
    _torchrun_env(monkeypatch)
    made = {}
    monkeypatch.setattr(D.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(D.dist, "init_process_group", lambda backend, **kw: made.update(backend=backend, **kw))
    monkeypatch.setattr(D.dist, "get_world_size", lambda *a: 2)
    monkeypatch.setattr(D.dist, "get_rank", lambda *a: 1)
    ctx, dev = D.setup("auto", timeout_s=42)
    assert dev == torch.device("cuda:1") and ("set_device", (torch.device("cuda:1"),)) in calls
    assert made == {"backend": "nccl", "timeout": datetime.timedelta(seconds=42), "device_id": torch.device("cuda:1")}
    assert ctx == D.Context(1, 2, 1, "nccl", 42.0, True)
    monkeypatch.setattr(D.dist, "get_rank", lambda *a: 0)
    monkeypatch.setattr(D.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(D.dist, "get_backend", lambda *a: "nccl")
    with pytest.raises(RuntimeError, match="does not match torchrun's environment"):
        D.setup("auto")
    with pytest.raises(ValueError, match="timeout must be positive"):
        D.setup("auto", timeout_s=0)


def test_wrap_ddp_on_a_gpu_passes_the_device(monkeypatch):
    """wrap_ddp's GPU arm: DDP gets ``device_ids=[device]``; the architecture parameters are
    left out of its all-reduce; buffers are not synchronised at each forward."""
    import inspect

    from adarts_kernels import distributed as D
    from adarts_kernels.nas.search_model import SearchNetwork
    made = {}
    real = torch.nn.parallel.DistributedDataParallel

    class FakeDDP:
        def __init__(self, module, **kw):
            made.update(kw, module=module)
    FakeDDP.__init__.__signature__ = inspect.signature(real.__init__)
    FakeDDP._set_params_and_buffers_to_ignore_for_model = staticmethod(real._set_params_and_buffers_to_ignore_for_model)
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", FakeDDP)
    model = SearchNetwork(8, 10, 2)
    D.wrap_ddp(model, torch.device("cuda:1"), ignore=model.arch_parameter_names())
    assert made["device_ids"] == [torch.device("cuda:1")] and made["gradient_as_bucket_view"] is True
    assert made.get("forward_sync_buffers", made.get("broadcast_buffers")) is False
    assert sorted(model._ddp_params_and_buffers_to_ignore) == ["alphas_normal", "alphas_reduce", "betas_normal",
                                                               "betas_reduce"]
    D.wrap_ddp(SearchNetwork(8, 10, 2), torch.device("cpu"))
    assert made["device_ids"] is None
