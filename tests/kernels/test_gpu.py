"""Real sizes on the GPU (`pytest -m gpu`): Llama-3-8B-like heads, bf16 and fp32, paged pools."""

from __future__ import annotations

import pytest
import torch
from _inputs import make_batch, small_config

from mp_kernels import kmeans, kmeans_reference
from mp_kernels.centroid_lookup import lookup
from mp_kernels.centroid_replace import centroid_replace
from mp_kernels.decode import multipole_decode
from mp_kernels.rotary import rotate_pairs
from mp_kernels.sparse_decode import sparse_decode
from mp_sglang.method import reference
from mp_sglang.method.rope import Rope

pytestmark = pytest.mark.gpu
LENS = [3000, 777, 5000]


def _config(budget):
    return small_config(
        token_budget=budget,
        tokens_per_cluster=16,
        kmeans_block=1024,
        kmeans_iters=4,
        recent_window=64,
        sink_tokens=10,
        levels=1,
    )


@pytest.mark.parametrize(
    "dtype,page_size,budget",
    [
        (torch.bfloat16, 16, 0.05),
        (torch.float32, 1, 0.02),
        (torch.bfloat16, 1, 0),
        (torch.float32, 16, 100_000),
    ],
)
def test_decode_real_sizes(dtype, page_size, budget):
    cfg = _config(budget)
    batch = make_batch(
        LENS, heads=8, group=4, dim=128, cfg=cfg, dtype=dtype, page_size=page_size, seed=11, device="cuda"
    )
    out = multipole_decode(batch.q, batch.q, batch.kv, batch.index, batch.budget, batch.max_exact)
    assert not out.isnan().any()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for b, index in enumerate(batch.indices):
        ref = reference.decode_attention(batch.q[b].float().cpu(), batch.keys[b], batch.values[b], index, cfg)
        err = (out[b].float().cpu() - ref).norm() / ref.norm()
        assert err <= tol, (b, float(err))


def test_decode_replays_from_a_cuda_graph():
    """The approximate part runs on a side stream: captured in a graph, the fork and join must
    order it exactly as eager execution does (same output, bit for bit)."""
    cfg = _config(0.02)
    batch = make_batch(LENS, heads=8, group=4, dim=128, cfg=cfg, dtype=torch.bfloat16, seed=13, device="cuda")
    args = (batch.q, batch.q, batch.kv, batch.index, batch.budget, batch.max_exact)
    eager = multipole_decode(*args)
    out = torch.full_like(eager, float("nan"))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        multipole_decode(*args, out=out)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        multipole_decode(*args, out=out)
    for _ in range(3):
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernels_vs_torch_references(dtype):
    cfg = _config(0.05)
    batch = make_batch(
        LENS, heads=8, group=4, dim=128, cfg=cfg, dtype=dtype, page_size=16, seed=12, device="cuda"
    )
    got = lookup(batch.q, batch.index, batch.budget, batch.max_exact, backend="triton")
    ref = lookup(batch.q, batch.index, batch.budget, batch.max_exact, backend="torch")
    for b, n in enumerate(batch.index.levels[0].num_clusters.tolist()):  # past n: unwritten
        assert torch.equal(got.selected[0][b, :, :n], ref.selected[0][b, :, :n])
    assert torch.equal(got.exact.lengths(), ref.exact.lengths())
    for b in range(len(LENS)):
        for h in range(8):
            assert torch.equal(got.exact.positions(b, h), ref.exact.positions(b, h))
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for fn_args in (
        (sparse_decode, (batch.q, batch.kv, got.exact, 7)),
        (centroid_replace, (got.logits[0], got.selected[0], batch.index.levels[0], 5)),
    ):
        fn, args = fn_args
        out, lse = fn(*args, backend="triton")
        ref_out, ref_lse = fn(*args, backend="torch")
        assert not out.isnan().any() and not lse.isnan().any()
        assert (out - ref_out).norm() <= tol * ref_out.norm()
        finite = torch.isfinite(ref_lse)
        assert torch.equal(finite, torch.isfinite(lse))
        assert torch.allclose(lse[finite], ref_lse[finite], atol=1e-3 if dtype != torch.float32 else 1e-5)


def test_kmeans_real_sizes():
    gen = torch.Generator().manual_seed(3)
    blocks, n, c = 4, 8192, 512
    points = torch.randn(blocks * n, 8, 128, generator=gen).cuda()
    ps = torch.arange(blocks, dtype=torch.int32, device="cuda") * n
    cs = torch.arange(blocks, dtype=torch.int32, device="cuda") * c
    npts = torch.full((blocks,), n, dtype=torch.int32, device="cuda")
    ncl = torch.full((blocks,), c, dtype=torch.int32, device="cuda")
    init = points[(ps.long().unsqueeze(-1) + torch.arange(c, device="cuda")).flatten()]
    cen, labels = kmeans.lloyd(
        points, init, ps, npts, cs, ncl, n, 3, [torch.Generator().manual_seed(0)] * blocks
    )
    nearest = kmeans.assign(points, cen, ps, npts, cs, ncl, n)
    for b in (0, blocks - 1):
        pts = points[b * n : (b + 1) * n].transpose(0, 1)
        block_c = cen[b * c : (b + 1) * c].transpose(0, 1)
        dist = torch.cdist(pts.double(), block_c.double()) ** 2
        got = nearest[b * n : (b + 1) * n].t().long()
        chosen = dist.gather(-1, got.unsqueeze(-1)).squeeze(-1)
        assert torch.all(chosen <= dist.min(-1).values + 1e-3)  # nearest, ties aside
        # lloyd returns the exact member means of the labels it returns
        means, _ = kmeans_reference.cluster_means(
            pts.cpu(), labels[b * n : (b + 1) * n].t().long().cpu(), c, block_c.cpu()
        )
        assert torch.allclose(means, block_c.cpu(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("reseeded", [False, True])
def test_centroid_update_real_sizes(reseeded):
    """A build round's centroid update (8 blocks x 512 clusters x 8 heads, bf16 points) through
    the kernel, against its torch steps: fp32 centroids, their bf16 cast and norms."""
    gen = torch.Generator().manual_seed(4)
    rows, heads = 8 * 512, 8
    points = torch.randn(8 * 8192, heads, 128, generator=gen).to(torch.bfloat16).cuda()
    sums = torch.randn(rows, heads, 128, generator=gen).cuda()
    totals = torch.randint(0, 3, (rows, heads), generator=gen).float().cuda()
    centroids = torch.randn(rows, heads, 128, generator=gen).cuda()
    reseed = torch.randint(0, points.shape[0], (rows, heads), generator=gen).cuda() if reseeded else None
    got = kmeans.update_centroids(sums, totals, centroids, points, reseed)
    want = kmeans.update_centroids(sums, totals, centroids, points, reseed, backend="torch")
    assert got[1].dtype == torch.bfloat16
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.allclose(got[2], want[2], rtol=1e-5)


def test_rotary_real_sizes():
    """A fold's window of 16 layers x 8 heads (bf16 pool layout, fp32 out) and a batch of queries
    (bf16 out), through `Rope.apply`'s GPU path, against its torch path on the same inputs."""
    rope = Rope.standard(128, 500000.0)
    pool = torch.randn(8320, 128, 128, device="cuda").to(torch.bfloat16)
    keys = pool.transpose(0, 1)
    cos, sin = rope.cos_sin(-torch.arange(60000, 68320, device="cuda"), "cuda", torch.float32)
    got = rope.apply(keys, cos, sin)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, rotate_pairs(keys.float(), cos, sin, True), rtol=1e-5, atol=1e-5)
    q = torch.randn(8, 32, 128, device="cuda").to(torch.bfloat16)
    cos, sin = (t.cuda().unsqueeze(1) for t in rope.query_frame([65536 + i for i in range(8)], 64, "cpu"))
    got = rope.apply(q, cos, sin, out_dtype=torch.bfloat16)
    want = rotate_pairs(q.float(), cos, sin, True).to(torch.bfloat16)
    assert (got.float() - want.float()).abs().max() <= 2**-7 * want.float().abs().max()
