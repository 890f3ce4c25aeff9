"""The fused supernet on a GPU: every GPU backend against the reference supernet, a full
search step without host synchronisation, bf16 autocast and channels_last, recomputation.

Skipped where no CUDA device is visible. Backends that cannot run (no CUDA kernels built,
no Triton) are skipped with the reason.
"""

import pytest
import torch
from gpu_helpers import no_host_sync

from adarts_kernels.backend import why_unavailable

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible to torch")]


def gpu_impls():
    if not torch.cuda.is_available():
        return ["cuda", "triton"]
    return [pytest.param(n, marks=pytest.mark.skipif(why_unavailable(n, "cuda") is not None,
                                                     reason=str(why_unavailable(n, "cuda"))))
            for n in ("cuda", "triton")]




def nets(impl, recompute="none", C=8, layers=5):
    from adarts_kernels.nas import SearchNetwork
    from adarts_kernels.nas.search_model import FUSED_OPS
    torch.manual_seed(0)
    ref = SearchNetwork(C=C, num_classes=10, layers=layers, edge="adarts", kernels="modules").cuda()
    net = SearchNetwork(C=C, num_classes=10, layers=layers, edge="adarts", kernels="fused",
                        recompute=recompute, impl=impl).cuda()
    net.load_state_dict(ref.state_dict())
    assert net.backends() == {op: impl for op in FUSED_OPS}
    return ref, net


@pytest.mark.parametrize("impl", gpu_impls())
@pytest.mark.parametrize("recompute", ["none", "edge"])
def test_fused_supernet_matches_reference(impl, recompute):
    ref, net = nets(impl, recompute)
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(16, 3, 32, 32, device="cuda", generator=g)
    y = torch.randint(0, 10, (16,), device="cuda", generator=g)
    l_ref, l_net = ref.loss(x, y), net.loss(x, y)
    torch.testing.assert_close(l_net, l_ref, rtol=1e-4, atol=1e-5)
    l_ref.backward(), l_net.backward()
    for (n, p), (_, q) in zip(ref.named_parameters(), net.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-5, msg=n)
    for (n, b1), (_, b2) in zip(ref.named_buffers(), net.named_buffers()):
        torch.testing.assert_close(b2, b1, rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize("impl", gpu_impls())
@pytest.mark.parametrize("amp,channels_last", [(False, False), (True, True)])
def test_fused_search_step_makes_no_host_sync(impl, amp, channels_last):
    from adarts_kernels.nas.architect import Architect
    from adarts_kernels.nas.loops import search_step
    _, net = nets(impl)
    if amp:
        net.autocast_dtype = torch.bfloat16
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    w = list(net.weight_parameters())
    opt = torch.optim.SGD(w, lr=0.01, momentum=0.9, weight_decay=3e-4)
    arch = Architect(net)
    x = torch.randn(32, 3, 32, 32, device="cuda")
    y = torch.randint(0, 10, (32,), device="cuda")
    search_step(net, arch, opt, w, x, y, x, y, 0.01, 5.0, channels_last)   # warm-up: lazy init may sync
    with no_host_sync():
        for _ in range(2):
            loss, logits, vloss = search_step(net, arch, opt, w, x, y, x, y, 0.01, 5.0, channels_last)
    assert torch.isfinite(loss).item() and torch.isfinite(vloss).item()
