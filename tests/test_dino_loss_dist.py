"""Center all-reduce of the fused DINO loss across 2 gloo processes: ranks see
different teacher batches and must end with the same center, equal to the
reference's center computed on the concatenation of the ranks' batches."""
import pytest
import torch

from dino_fast.losses.dino_loss import DINOLoss
from dino_fast.kernels.dino_loss_reference import DINOLossReference
from tests._dist import run_distributed

B, K, NCROPS, STEPS = 3, 200, 3, 3
EPOCHS = (0, 5, 60)


def _batch(step, rank):
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(NCROPS * B, K, generator=g) * 2, torch.randn(2 * B, K, generator=g) * 2 + rank


IMPLS = ("triton", "torch")


def _worker(rank, world_size, out_dir):
    for impl in IMPLS:           # one spawn for both impls (process start-up dominates)
        loss_fn = DINOLoss(K, NCROPS, 0.04, 0.07, 30, 100, impl=impl)
        losses = []
        for step in range(STEPS):
            s, t = _batch(step, rank)
            losses.append(loss_fn(s, t, EPOCHS[step]).detach())
        torch.save({"center": loss_fn.center, "losses": torch.stack(losses)}, f"{out_dir}/{impl}{rank}.pt")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dino_loss_dist")
    run_distributed(_worker, str(out), world_size=2)
    return {impl: [torch.load(out / f"{impl}{r}.pt") for r in range(2)] for impl in IMPLS}


@pytest.mark.parametrize("impl", IMPLS)
def test_center_all_reduce_two_ranks(results, impl):
    got = results[impl]
    torch.testing.assert_close(got[0]["center"], got[1]["center"], rtol=0, atol=0)

    # reference, single process: the center from the concatenated teacher batches;
    # each rank's loss from its own batch with the center of that step
    ref = DINOLossReference(K, NCROPS, 0.04, 0.07, 30, 100).double()
    per_rank = DINOLossReference(K, NCROPS, 0.04, 0.07, 30, 100).double()
    for step in range(STEPS):
        batches = [_batch(step, r) for r in range(2)]
        for r, (s, t) in enumerate(batches):
            per_rank.center.copy_(ref.center)
            loss_r = per_rank(s.double(), t.double(), EPOCHS[step])
            torch.testing.assert_close(got[r]["losses"][step].double(), loss_r, rtol=2e-5, atol=0)
        # the reference's update on all rows at once (crop-major within each rank
        # does not matter for a sum)
        ref.update_center(torch.cat([t for _, t in batches]).double())
    torch.testing.assert_close(got[0]["center"].double(), ref.center, rtol=1e-6, atol=1e-6)
    assert ref.center.abs().max() > 0.1
