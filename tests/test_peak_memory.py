"""Peak of live tensors on CPU (adarts_kernels.profiling.peak) and the checkpointing peers
(adarts_kernels.profiling.checkpointed)."""
import pytest
import torch

from adarts_kernels.nas.architect import Architect
from adarts_kernels.nas.search_loop import search_step
from adarts_kernels.profiling import Checkpointed, PeakMemoryMode, checkpoint_supernet, peak_memory, step_state
from adarts_kernels.profiling.report import CHECKPOINT_VARIANTS, build_supernet


def test_peak_is_exact_on_a_hand_made_example():
    with PeakMemoryMode() as pm:
        a = torch.empty(1000)            # 4000 bytes
        b = torch.empty(1000)            # 8000 live
        del a                            # 4000 live
        c = torch.empty(500)             # 6000 live
    assert pm.peak_new_bytes == 8000 and pm.peak_bytes == 8000
    assert pm.live_new_bytes == 6000 and pm.allocations == 3
    del b, c
    assert pm.live_new_bytes == 0 and pm.live_bytes == 0


def test_views_and_in_place_ops_are_not_counted_again():
    with PeakMemoryMode() as pm:
        a = torch.zeros(1000)
        v = a[:10]
        t = a.view(10, 100).t()
        d = a.detach()
        a.add_(1)
        v.mul_(2)
        torch.add(a, 1, out=a)
    assert pm.allocations == 1 and pm.peak_new_bytes == 4000
    del a, d
    assert pm.live_new_bytes == 4000      # the views keep the storage alive
    del v, t
    assert pm.live_new_bytes == 0


def test_baseline_is_separate_and_leaves_when_it_dies():
    x = torch.zeros(250)                  # 1000 bytes, exists before
    old = torch.zeros(500)                # 2000 bytes, freed inside
    holder = [old]
    del old
    with PeakMemoryMode(baseline=[x, holder[0]]) as pm:
        holder.clear()                    # 1000 live
        y = x + 1                         # 2000 live, 1000 new
        x.add_(1)                         # in place on a baseline storage: nothing new
    assert pm.baseline_bytes == 3000 and pm.peak_bytes == 3000 and pm.peak_new_bytes == 1000
    assert pm.live_bytes == 2000
    del y


def test_backward_ops_are_seen():
    w = torch.randn(100, requires_grad=True)
    pm = peak_memory(lambda: w.exp().sum().backward(), baseline=[w])
    assert w.grad is not None
    # exp's result (400 bytes, saved for backward) is alive when backward makes the gradient
    # (400 bytes, stays); the loss and its gradient are scalars
    assert pm.live_new_bytes == 400 and 800 <= pm.peak_new_bytes <= 820
    assert pm.baseline_bytes == 400


def _peak_step(variant, C=8, layers=5, size=16, batch=4):
    net = build_supernet(variant, C, layers, impl="reference")
    w = list(net.weight_parameters())
    opt = torch.optim.SGD(w, lr=0.01, momentum=0.9, weight_decay=3e-4)
    arch = Architect(net)
    torch.manual_seed(1)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 10, (batch,))

    def step():
        search_step(net, arch, opt, w, x, y, x, y, 0.01, 5.0)
    step()
    with PeakMemoryMode(baseline=step_state(net, opt, arch.optimizer, x, y)) as pm:
        step()
    return pm, net


def test_small_supernet_peak_pcdarts_above_fused_recompute():
    pc, _ = _peak_step("pcdarts")
    fr, _ = _peak_step("adarts-fused-recompute")
    assert pc.peak_new_bytes > 2 * fr.peak_new_bytes, (pc.peak_new_bytes, fr.peak_new_bytes)
    assert pc.baseline_bytes > 0 and fr.baseline_bytes > pc.baseline_bytes   # attention MLPs


@pytest.mark.parametrize("variant", list(CHECKPOINT_VARIANTS))
def test_checkpointed_peers_compute_the_same_step_with_less_memory(variant):
    base_name = CHECKPOINT_VARIANTS[variant][0]
    base_pm, base = _peak_step(base_name)
    pm, net = _peak_step(variant)
    per = CHECKPOINT_VARIANTS[variant][1]
    wrapped = [m for m in net.modules() if isinstance(m, Checkpointed)]
    assert len(wrapped) == (5 if per == "cell" else 5 * 14)
    # same weights after two full search steps (BatchNorm normalises with batch statistics)
    for p, q in zip(base.parameters(), net.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert pm.peak_new_bytes < base_pm.peak_new_bytes


def test_checkpoint_moves_batchnorm_statistics_twice():
    """What a user of torch.utils.checkpoint gets: the recomputation updates BatchNorm's
    running statistics again."""
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(3)
    ck = Checkpointed(torch.nn.BatchNorm2d(3))
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    bn(x).sum().backward()
    ck(x).sum().backward()
    assert bn.num_batches_tracked.item() == 1 and ck.num_batches_tracked.item() == 2


def test_checkpoint_supernet_rejects_bad_input():
    net = build_supernet("pcdarts", 8, 3)
    with pytest.raises(ValueError, match="granularity"):
        checkpoint_supernet(net, "node")
    checkpoint_supernet(net, "cell")
    assert all(isinstance(c, Checkpointed) and isinstance(c.reduction, bool) for c in net.cells)
    with pytest.raises(ValueError, match="already"):
        checkpoint_supernet(net, "cell")
