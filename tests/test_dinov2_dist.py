"""The DINOv2 objectives across 2 gloo processes equal one process on the
concatenated batch: Sinkhorn-Knopp (functional and both modules; unequal row
counts, a rank without rows, logits that overflow a plain exp), the lazily
applied centres (DINOv2's all-reduce of the batch sums), and DINOv3's
distributed KoLeo (global and per-rank groups, gradients through the
all-gather). One spawn runs everything (process start-up dominates).
References are float64 formulas written here.
"""
import pytest
import torch

from dino_fast.dinov2 import DINOLoss, KoLeoLossDistributed, iBOTPatchLoss
from dino_fast.kernels.sinkhorn_knopp import sinkhorn_knopp
from tests._dist import run_distributed

K, TAU = 301, 0.04
ROWS = (5, 8)                  # rows per rank (unequal)
IMPLS = ("triton", "torch")


def _rows(rank, n=None, scale=8.0, seed=0):
    g = torch.Generator().manual_seed(seed * 10 + rank)
    return torch.randn(ROWS[rank] if n is None else n, K, generator=g) * scale   # |t| / tau ~ 900


def _koleo_x(rank):
    return torch.randn(6, 17, generator=torch.Generator().manual_seed(50 + rank))


def _worker(rank, world_size, out_dir):
    out = {}
    for impl in IMPLS:
        out[f"sk_{impl}"] = sinkhorn_knopp(_rows(rank), TAU, impl=impl)
        # a rank without masked tokens (iBOT): the collectives still line up
        out[f"sk_empty_{impl}"] = sinkhorn_knopp(_rows(rank, n=0 if rank == 1 else 7, seed=1), TAU, impl=impl)
        ibot = iBOTPatchLoss(K, impl=impl)
        n_tensor = torch.tensor([ROWS[rank]])
        out[f"ibot_sk_{impl}"] = ibot.sinkhorn_knopp_teacher(_rows(rank), TAU, n_tensor)
        assert int(n_tensor) == ROWS[rank]             # left alone (DINOv2 all-reduces it in place)
        dino = DINOLoss(K, impl=impl)
        for step in range(2):
            t = _rows(rank, scale=1.0, seed=2 + step)
            dino.softmax_center_teacher(t, TAU)
            dino.update_center(t)
            ibot.softmax_center_teacher(t[None], TAU)
            ibot.update_center(t[None])
        dino.apply_center_update()
        ibot.apply_center_update()
        out[f"dino_center_{impl}"] = dino.center
        out[f"ibot_center_{impl}"] = ibot.center
    for name, group_size in (("koleo_global", None), ("koleo_local", 6)):
        x = _koleo_x(rank).requires_grad_()
        loss = KoLeoLossDistributed(loss_group_size=group_size)(x)
        loss.backward()
        out[name] = (loss.detach(), x.grad)
    torch.save(out, f"{out_dir}/rank{rank}.pt")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dinov2_dist")
    run_distributed(_worker, str(out), world_size=2)
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


def log_sinkhorn_float64(t, tau=TAU, n_iterations=3):
    x = t.double() / tau
    lse = torch.zeros(x.shape[0], dtype=torch.float64)
    for _ in range(n_iterations):
        v = -torch.logsumexp(x - lse[:, None], dim=0)
        lse = torch.logsumexp(x + v, dim=1)
    return torch.exp(x + v - lse[:, None])


def _close(got, want, rel=1e-4):
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, rtol=0, atol=rel * float(want.abs().max()))


@pytest.mark.parametrize("impl", IMPLS)
def test_sinkhorn_knopp_two_ranks_equals_one_process(results, impl):
    whole = log_sinkhorn_float64(torch.cat([_rows(0), _rows(1)]))
    for key in ("sk", "ibot_sk"):
        _close(torch.cat([results[0][f"{key}_{impl}"], results[1][f"{key}_{impl}"]]), whole)
    # and equal to this very implementation run in one process on the concatenation
    single = sinkhorn_knopp(torch.cat([_rows(0), _rows(1)]), TAU, impl=impl)
    _close(torch.cat([results[0][f"sk_{impl}"], results[1][f"sk_{impl}"]]), single.double(), rel=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_sinkhorn_knopp_with_a_rank_without_rows(results, impl):
    assert results[1][f"sk_empty_{impl}"].shape == (0, K)
    _close(results[0][f"sk_empty_{impl}"], log_sinkhorn_float64(_rows(0, n=7, seed=1)))


@pytest.mark.parametrize("impl", IMPLS)
def test_centres_are_all_reduced_as_dinov2(results, impl):
    # DINO: the all-reduced row sum over (this rank's rows x world size) -- DINOv2 assumes
    # equal per-rank batches, so with 5 and 8 rows the ranks' centres differ, as in DINOv2;
    # iBOT (inputs (1, tokens, K)): the mean over ranks of each rank's token mean
    dino = [torch.zeros(1, K, dtype=torch.float64) for _ in range(2)]
    ibot = torch.zeros(1, 1, K, dtype=torch.float64)
    for step in range(2):
        ts = [_rows(r, scale=1.0, seed=2 + step).double() for r in range(2)]
        total = torch.cat(ts).sum(0, keepdim=True)
        dino = [0.9 * dino[r] + 0.1 * total / (ROWS[r] * 2) for r in range(2)]
        ibot = 0.9 * ibot + 0.1 * torch.stack([t.mean(0) for t in ts]).mean(0).view(1, 1, K)
    for r in range(2):
        torch.testing.assert_close(results[r][f"dino_center_{impl}"].double(), dino[r], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(results[r][f"ibot_center_{impl}"].double(), ibot, rtol=1e-6, atol=1e-7)


def _koleo_rank_loss(x_all, rows, group_rows, eps=1e-8):
    """KoLeo of `rows` (indices into x_all) with neighbours among `group_rows`."""
    x = torch.nn.functional.normalize(x_all, eps=eps, dim=-1)
    d2 = ((x[rows, None, :] - x[None, group_rows, :]) ** 2).sum(-1)
    d2[torch.tensor(rows)[:, None] == torch.tensor(group_rows)[None, :]] = float("inf")
    nn_idx = torch.tensor(group_rows)[d2.argmin(1)]
    return -torch.log((x[rows] - x[nn_idx] + eps).norm(dim=-1) + eps).mean()


@pytest.mark.parametrize("name", ["koleo_global", "koleo_local"])
def test_distributed_koleo_equals_one_process(results, name):
    x_all = torch.cat([_koleo_x(0), _koleo_x(1)]).double().requires_grad_()   # (12, 17)
    per_rank = [list(range(0, 6)), list(range(6, 12))]
    losses = [_koleo_rank_loss(x_all, rows, list(range(12)) if name == "koleo_global" else rows)
              for rows in per_rank]
    sum(losses).backward()                      # each rank's gradient: all ranks' losses through the gather
    for r in range(2):
        loss, grad = results[r][name]
        torch.testing.assert_close(loss.double(), losses[r].detach(), rtol=1e-6, atol=0)
        torch.testing.assert_close(grad.double(), x_all.grad[6 * r:6 * r + 6], rtol=1e-5, atol=1e-7)
