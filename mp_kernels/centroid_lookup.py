"""Centroid lookup: score every centroid, select clusters within the token budget, list the tokens.

Three launches per decode step (one more pair per extra hierarchy level), none needing a host sync:

1. `centroid_scores`: logits `s + log N` of every query head against every candidate centroid
   (grid over requests × KV heads × centroid tiles, so the centroid bytes stream at full width).
2. `select_within_budget`: per (request, KV head), GQA importance (softmax per query head, mean
   over the group) and the budgeted prefix of clusters in descending importance.
3. `expand_selection`: the members of the selected clusters, the listed part of the exact tokens.

Sizes: a server sizes every step for its longest possible request (`max_clusters`, a static bound
so that one CUDA graph serves any batch), but the work follows each request's own clusters. A few
score programs per (request, head) loop over that request's tiles (`programs_per_row`), leaving
logits past its clusters unwritten (every reader stops at `num_clusters`); the selection runs as
a few launches of growing lane widths (`SELECT_WIDTHS`, then the bound), each taking the requests
whose clusters fit it and not the one before: a request of 2K tokens is selected over 256 lanes,
not over the 8K lanes that a 128K context needs (one selection is a chain of block-wide
reductions whose length follows the lanes); a request with no clusters is done at once. The
expansion lists only the chosen clusters' members (`layout.ExactTokens`): the sinks and the
recent window are ranges, so a row with no clusters costs it nothing.

Selection without a sort: with positive sizes, the prefix "descending importance while cumulative
size <= budget" is exactly the clusters whose key exceeds a threshold, plus a prefix (by cluster id)
of those whose key equals it. The key is the top 16 bits of the importance's fp32 bit pattern
(monotone for values >= 0; the reference ranks by the same truncation, `ranking_key` below), the
threshold is found by 16 rounds of bisection over the key range, each a register-resident
reduction. Tie rule = the reference's stable sort: equal key, lower cluster id first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from mp_kernels.dispatch import exact_dots, next_power_of_2, programs_per_row, use_triton
from mp_kernels.layout import BatchIndex, ExactTokens, LevelTensors


@dataclass(frozen=True)
class Lookup:
    """What the lookup hands to the sparse and replacement kernels.

    exact: the tokens attended exactly. logits `[B, Hq, C_l]` fp32 and selected `[B, H, C_l]` int8,
    per level (fine → coarse): candidates have finite logits; candidates not selected are
    approximated. Entries past a request's `num_clusters` are unspecified.
    """

    exact: ExactTokens
    logits: tuple[torch.Tensor, ...]
    selected: tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class Selection:
    """One level's selection: the mask plus a compact list for expansion.

    sel_ids / sel_cum `[B, H, C]` int32: the selected cluster ids in ascending order and the
    inclusive running sum of their sizes (only the first num_sel are written: the rest is
    garbage, never read); num_sel / sel_tokens `[B, H]`.
    """

    selected: torch.Tensor
    sel_ids: torch.Tensor
    sel_cum: torch.Tensor
    num_sel: torch.Tensor
    sel_tokens: torch.Tensor


def lookup(
    q_lookup: torch.Tensor,
    index: BatchIndex,
    budget: torch.Tensor,
    max_exact: int,
    level_budget_multiplier: float = 4.0,
    sm_scale: float | None = None,
    backend: str | None = None,
) -> Lookup:
    """Centroid lookup of a batch, coarsest level first (the reference's `lookup`).

    q_lookup `[B, Hq, d]`: the query in the index's frame (rotated to the lookup position under
    windowed RoPE). budget `[B]` int32: exact tokens at level 0; level l admits
    floor(budget * level_budget_multiplier**l). max_exact: static capacity of the token list, at
    least sink_len + budget + recent window of every request.
    """
    logits, selections = select_levels(q_lookup, index, budget, level_budget_multiplier, sm_scale, backend)
    exact = expand_selection(selections[0], index, max_exact, backend)
    return Lookup(exact, logits, tuple(s.selected for s in selections))


def select_levels(
    q_lookup: torch.Tensor,
    index: BatchIndex,
    budget: torch.Tensor,
    level_budget_multiplier: float = 4.0,
    sm_scale: float | None = None,
    backend: str | None = None,
) -> tuple[tuple[torch.Tensor, ...], tuple[Selection, ...]]:
    """The lookup up to its selections (fine → coarse), without the token list: the approximate
    part needs only these, so a decode step can start it while the list is expanded."""
    scale = 1.0 / math.sqrt(q_lookup.shape[-1]) if sm_scale is None else sm_scale
    num_levels = len(index.levels)
    logits: list[torch.Tensor] = [q_lookup] * num_levels
    selections: list[Selection] = []
    parent_selected = None
    for lvl in range(num_levels - 1, -1, -1):
        level = index.levels[lvl]
        level_budget = budget
        if lvl:
            level_budget = torch.floor(budget.double() * level_budget_multiplier**lvl).to(torch.int32)
        logits[lvl] = centroid_scores(q_lookup, level, parent_selected, scale, backend)
        selections.insert(0, select_within_budget(logits[lvl], level, level_budget, backend))
        parent_selected = selections[0].selected
    return tuple(logits), tuple(selections)


# --------------------------------------------------------------------------- scores


def centroid_scores(
    q: torch.Tensor,
    level: LevelTensors,
    parent_selected: torch.Tensor | None,
    scale: float,
    backend: str | None = None,
) -> torch.Tensor:
    """Logits `q·Kc * scale + log N` `[B, Hq, max_clusters]`; -inf for non-candidates, and left
    unwritten past each request's `num_clusters` by the kernel (module doc).

    A candidate is a non-empty cluster whose parent (if the level has parents) is selected in
    `parent_selected [B, H, C_parent]`.
    """
    batch, num_q_heads, dim = q.shape
    heads = level.counts.shape[1]
    group = num_q_heads // heads
    logits = torch.empty(batch, num_q_heads, level.max_clusters, dtype=torch.float32, device=q.device)
    has_parent = parent_selected is not None and level.parent is not None
    if not use_triton(q, backend):
        _scores_reference(q, level, parent_selected if has_parent else None, scale, logits)
        return logits
    parent = level.parent if has_parent else level.counts
    psel = parent_selected if has_parent else logits
    block_c = 64
    programs = programs_per_row(batch * heads, triton.cdiv(level.max_clusters, block_c))
    _scores_kernel[(batch * heads, programs)](
        q,
        level.centroids,
        level.counts,
        level.cluster_start,
        level.num_clusters,
        parent,
        psel,
        logits,
        scale,
        heads,
        group,
        level.max_clusters,
        programs,
        q.stride(0),
        q.stride(1),
        level.centroids.stride(0),
        level.centroids.stride(1),
        level.counts.stride(0),
        level.counts.stride(1),
        parent.stride(0),
        parent.stride(1),
        psel.stride(0),
        psel.stride(1),
        logits.stride(0),
        logits.stride(1),
        HAS_PARENT=has_parent,
        D=dim,
        G_PAD=max(16, next_power_of_2(group)),
        BLOCK_C=block_c,
        IEEE=exact_dots(level.centroids.dtype),
        num_warps=8,
    )
    return logits


def _scores_reference(
    q: torch.Tensor,
    level: LevelTensors,
    parent_selected: torch.Tensor | None,
    scale: float,
    logits: torch.Tensor,
) -> None:
    heads = level.counts.shape[1]
    logits.fill_(float("-inf"))
    for b in range(q.shape[0]):
        start, n = int(level.cluster_start[b]), int(level.num_clusters[b])
        if n == 0:
            continue
        centroids = level.centroids[start : start + n].float().transpose(0, 1)  # [H, n, d]
        counts = level.counts[start : start + n].t().long()  # [H, n]
        qg = q[b].float().reshape(heads, -1, q.shape[-1])
        score = torch.einsum("hgd,hcd->hgc", qg, centroids) * scale
        eligible = counts > 0
        if parent_selected is not None:
            parents = level.parent[start : start + n].t().long()
            eligible &= parent_selected[b].gather(1, parents) != 0
        lg = (score + counts.clamp_min(1).float().log().unsqueeze(1)).masked_fill(
            ~eligible.unsqueeze(1), float("-inf")
        )
        logits[b, :, :n] = lg.reshape(q.shape[1], n)


@triton.jit
def _scores_kernel(
    q,
    centroids,
    counts,
    cluster_start,
    num_clusters,
    parent,
    parent_sel,
    logits,
    scale,
    H,
    G,
    max_c,
    programs,
    stride_qb,
    stride_qh,
    stride_cr,
    stride_ch,
    stride_nr,
    stride_nh,
    stride_pr,
    stride_ph,
    stride_psb,
    stride_psh,
    stride_lb,
    stride_lh,
    HAS_PARENT: tl.constexpr,
    D: tl.constexpr,
    G_PAD: tl.constexpr,
    BLOCK_C: tl.constexpr,
    IEEE: tl.constexpr,
):
    # A few programs per (request, head), each taking every `programs`-th tile of the request's
    # own clusters: logits past them are left unwritten (nothing reads them).
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    n = tl.load(num_clusters + b)
    if tl.program_id(1) * BLOCK_C >= n:
        return
    row0 = tl.load(cluster_start + b).to(tl.int64)
    d = tl.arange(0, D)
    g = tl.arange(0, G_PAD)
    g_mask = g < G
    qv = tl.load(
        q + b * stride_qb + (h * G + g)[:, None] * stride_qh + d[None, :], mask=g_mask[:, None], other=0.0
    )
    for tile in range(tl.program_id(1), tl.cdiv(n, BLOCK_C), programs):
        c = tile * BLOCK_C + tl.arange(0, BLOCK_C)
        valid = c < n
        rows = row0 + c
        cnt = tl.load(counts + rows * stride_nr + h * stride_nh, mask=valid, other=0)
        eligible = valid & (cnt > 0)
        if HAS_PARENT:
            par = tl.load(parent + rows * stride_pr + h * stride_ph, mask=eligible, other=0)
            psel = tl.load(parent_sel + b * stride_psb + h * stride_psh + par, mask=eligible, other=0)
            eligible = eligible & (psel != 0)
        keys = tl.load(
            centroids + rows[:, None] * stride_cr + h * stride_ch + d[None, :],
            mask=eligible[:, None],
            other=0.0,
        )
        if IEEE:
            score = tl.dot(qv.to(tl.float32), tl.trans(keys.to(tl.float32)), input_precision="ieee")
        else:
            score = tl.dot(qv.to(keys.dtype), tl.trans(keys))
        lg = score * scale + tl.log(tl.maximum(cnt, 1).to(tl.float32))[None, :]
        lg = tl.where(eligible[None, :], lg, float("-inf"))
        tl.store(
            logits + b * stride_lb + (h * G + g)[:, None] * stride_lh + c[None, :],
            lg,
            mask=g_mask[:, None] & (c < max_c)[None, :],
        )


# Lane widths of the selection's narrower launches (module doc): 256 lanes hold the clusters of a
# 4K-token request, 2048 of a 32K one.
SELECT_WIDTHS = (256, 2048)


# --------------------------------------------------------------------------- selection


def select_within_budget(
    logits: torch.Tensor, level: LevelTensors, budget: torch.Tensor, backend: str | None = None
) -> Selection:
    """Budgeted selection of one level from its logits (see the module doc for the method).

    Lanes past a request's `num_clusters` of `selected`, `sel_ids` and `sel_cum` are left unwritten.
    """
    batch, num_q_heads, max_c = logits.shape
    heads = level.counts.shape[1]
    dev = logits.device
    selected = torch.empty(batch, heads, max_c, dtype=torch.int8, device=dev)
    sel_ids = torch.empty(batch, heads, max_c, dtype=torch.int32, device=dev)
    sel_cum = torch.empty(batch, heads, max_c, dtype=torch.int32, device=dev)
    num_sel = torch.empty(batch, heads, dtype=torch.int32, device=dev)
    sel_tokens = torch.empty(batch, heads, dtype=torch.int32, device=dev)
    out = Selection(selected, sel_ids, sel_cum, num_sel, sel_tokens)
    if not use_triton(logits, backend):
        _select_reference(logits, level, budget, out)
        return out
    lanes = next_power_of_2(max_c)
    group_pad = next_power_of_2(num_q_heads // heads)
    fewer = -1  # the launch takes requests of more clusters than this, up to its width
    for width in [w for w in SELECT_WIDTHS if w < lanes] + [lanes]:
        _select_kernel[(batch * heads,)](
            logits,
            level.counts,
            level.cluster_start,
            level.num_clusters,
            budget,
            selected,
            sel_ids,
            sel_cum,
            num_sel,
            sel_tokens,
            heads,
            num_q_heads // heads,
            fewer,
            logits.stride(0),
            logits.stride(1),
            level.counts.stride(0),
            level.counts.stride(1),
            selected.stride(0),
            selected.stride(1),
            BLOCK_C=width,
            G_PAD=group_pad,
            ROW_BY_ROW=width * group_pad > 16384,
            num_warps=max(4, min(16, width // 256)),
        )
        fewer = width
    return out


def _select_reference(
    logits: torch.Tensor, level: LevelTensors, budget: torch.Tensor, out: Selection
) -> None:
    batch, num_q_heads, max_c = logits.shape
    heads = level.counts.shape[1]
    out.selected.zero_()
    for b in range(batch):
        start = int(level.cluster_start[b])
        lg = logits[b].reshape(heads, num_q_heads // heads, max_c)
        importance = torch.softmax(lg, dim=-1).nan_to_num(0.0).mean(dim=1)  # [H, C]
        eligible = lg[:, 0] > float("-inf")
        counts = torch.zeros(heads, max_c, dtype=torch.long, device=logits.device)
        n = int(level.num_clusters[b])
        counts[:, :n] = level.counts[start : start + n].t().long()
        ranked = ranking_key(importance).masked_fill(~eligible, -1.0)
        order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices
        sizes = torch.where(eligible, counts, 0).gather(1, order)
        fits = (sizes.cumsum(-1) <= int(budget[b])) & eligible.gather(1, order)
        selected = torch.zeros_like(eligible).scatter(1, order, fits)
        out.selected[b] = selected.to(torch.int8)
        for h in range(heads):
            ids = torch.nonzero(selected[h]).flatten()
            out.sel_ids[b, h, : len(ids)] = ids.to(torch.int32)
            out.sel_cum[b, h, : len(ids)] = counts[h, ids].cumsum(0).to(torch.int32)
            out.num_sel[b, h] = len(ids)
            out.sel_tokens[b, h] = int(counts[h, ids].sum())


@triton.jit
def _add_pairs(a0, b0, a1, b1):
    return a0 + a1, b0 + b1


@triton.jit
def _select_kernel(
    logits,
    counts,
    cluster_start,
    num_clusters,
    budget,
    selected,
    sel_ids,
    sel_cum,
    num_sel,
    sel_tokens,
    H,
    G,
    fewer,
    stride_lb,
    stride_lh,
    stride_nr,
    stride_nh,
    stride_sb,
    stride_sh,
    BLOCK_C: tl.constexpr,
    G_PAD: tl.constexpr,
    ROW_BY_ROW: tl.constexpr,
):
    # One program walks all clusters of a (request, KV head); its time is a chain of block-wide
    # reductions, so each step reduces the group's rows, or two quantities, at once. Past 16K
    # values the group's rows no longer fit the registers well and go one at a time (H100, in the
    # decode step: 8192 lanes x 4 rows 74.3 us, row by row 72.8 us; 2048 lanes 36.3 -> 35.5 us).
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    n = tl.load(num_clusters + b)
    if (n <= fewer) | (n > BLOCK_C):
        return  # another launch's request (module doc)
    if n == 0:  # nothing to select (the first launch's)
        tl.store(num_sel + pid, 0)
        tl.store(sel_tokens + pid, 0)
        return
    c = tl.arange(0, BLOCK_C)
    in_range = c < n
    base = logits + b * stride_lb + h * G * stride_lh
    if ROW_BY_ROW:
        importance = tl.zeros([BLOCK_C], tl.float32)
        for g in range(G):
            row = tl.load(base + g * stride_lh + c, mask=in_range, other=float("-inf"))
            top = tl.max(row, axis=0)
            p = tl.exp(row - tl.where(top == float("-inf"), 0.0, top))
            total = tl.sum(p, axis=0)
            importance += p / tl.where(total == 0.0, 1.0, total)
    else:
        g = tl.arange(0, G_PAD)
        rows = tl.load(
            base + g[:, None] * stride_lh + c[None, :],
            mask=(g < G)[:, None] & in_range[None, :],
            other=float("-inf"),
        )
        top = tl.max(rows, axis=1)
        p = tl.exp(rows - tl.where(top == float("-inf"), 0.0, top)[:, None])
        total = tl.sum(p, axis=1)
        importance = tl.sum(p / tl.where(total == 0.0, 1.0, total)[:, None], axis=0)
    importance = importance / G
    eligible = tl.load(base + c, mask=in_range, other=float("-inf")) > float("-inf")
    row0 = tl.load(cluster_start + b).to(tl.int64)
    sizes = tl.load(counts + (row0 + c) * stride_nr + h * stride_nh, mask=eligible, other=0)
    key = tl.where(eligible, importance.to(tl.int32, bitcast=True) >> 16, -1)
    cap = tl.load(budget + b)

    # Largest key value v whose clusters (key >= v) together exceed the budget.
    lo = tl.zeros([], tl.int32) - 1
    hi = tl.zeros([], tl.int32) + 0x7F81  # above every finite key
    for _ in range(16):
        mid = lo + (hi - lo) // 2
        over = tl.sum(tl.where(key >= mid, sizes, 0), axis=0) > cap
        lo = tl.where(over, mid, lo)
        hi = tl.where(over, hi, mid)
    above = key > lo
    tied = key == lo
    taken, everything = tl.reduce((tl.where(above, sizes, 0), sizes), 0, _add_pairs)
    chosen = above | (tied & (taken + tl.cumsum(tl.where(tied, sizes, 0), axis=0) <= cap))
    chosen = tl.where(everything <= cap, eligible, chosen)

    out = b * stride_sb + h * stride_sh
    tl.store(selected + out + c, chosen.to(tl.int8), mask=in_range)
    chosen_sizes = tl.where(chosen, sizes, 0)
    rank, running = tl.associative_scan((chosen.to(tl.int32), chosen_sizes), 0, _add_pairs)
    tl.store(sel_ids + out + rank - 1, c, mask=chosen)
    tl.store(sel_cum + out + rank - 1, running, mask=chosen)
    n_chosen, n_tokens = tl.reduce((chosen.to(tl.int32), chosen_sizes), 0, _add_pairs)
    tl.store(num_sel + pid, n_chosen)
    tl.store(sel_tokens + pid, n_tokens)


# --------------------------------------------------------------------------- expansion


def expand_selection(
    selection: Selection, index: BatchIndex, max_exact: int, backend: str | None = None
) -> ExactTokens:
    """The exact tokens of a batch: sinks, members of the selected clusters (at most `max_exact`,
    a server's bound), recent window. Only the members are listed (`ExactTokens`), by a few
    programs per (request, head) looping over the request's own tiles of the list."""
    batch, heads, max_c = selection.selected.shape
    dev = selection.selected.device
    chosen = torch.empty(batch, heads, max_exact, dtype=torch.int32, device=dev)
    exact = ExactTokens(index.sink_len, chosen, selection.sel_tokens, index.recent_start, index.seq_lens)
    if not use_triton(selection.selected, backend):
        _expand_reference(selection, index, chosen)
        return exact
    level = index.levels[0]
    block = 256
    programs = programs_per_row(batch * heads, triton.cdiv(max_exact, block))
    _expand_kernel[(batch * heads, programs)](
        selection.sel_ids,
        selection.sel_cum,
        selection.num_sel,
        selection.sel_tokens,
        level.counts,
        level.cluster_start,
        index.member_start,
        index.members,
        chosen,
        heads,
        max_exact,
        programs,
        selection.sel_ids.stride(0),
        selection.sel_ids.stride(1),
        level.counts.stride(0),
        level.counts.stride(1),
        index.member_start.stride(0),
        index.member_start.stride(1),
        index.members.stride(0),
        index.members.stride(1),
        chosen.stride(0),
        chosen.stride(1),
        BLOCK=block,
        SEARCH_STEPS=max_c.bit_length() + 1,
        num_warps=4,
    )
    return exact


def _expand_reference(selection: Selection, index: BatchIndex, chosen: torch.Tensor) -> None:
    level = index.levels[0]
    batch, heads, _ = selection.selected.shape
    cap = chosen.shape[-1]
    chosen.zero_()
    for b in range(batch):
        for h in range(heads):
            parts = [torch.zeros(0, dtype=torch.long)]
            for cid in selection.sel_ids[b, h, : int(selection.num_sel[b, h])].tolist():
                row = int(level.cluster_start[b]) + cid
                first = int(index.member_start[row, h])
                parts.append(index.members[first : first + int(level.counts[row, h]), h].long().cpu())
            members = torch.cat(parts)[:cap]
            chosen[b, h, : len(members)] = members.to(torch.int32)


@triton.jit
def _expand_kernel(
    sel_ids,
    sel_cum,
    num_sel,
    sel_tokens,
    counts,
    cluster_start,
    member_start,
    members,
    chosen,
    H,
    cap,
    programs,
    stride_sb,
    stride_sh,
    stride_nr,
    stride_nh,
    stride_msr,
    stride_msh,
    stride_mr,
    stride_mh,
    stride_cb,
    stride_ch,
    BLOCK: tl.constexpr,
    SEARCH_STEPS: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    n_sel = tl.load(num_sel + pid)
    sel_len = tl.minimum(tl.load(sel_tokens + pid), cap)
    sel_base = b * stride_sb + h * stride_sh
    row0 = tl.load(cluster_start + b).to(tl.int64)
    for tile in range(tl.program_id(1), tl.cdiv(sel_len, BLOCK), programs):
        k = tile * BLOCK + tl.arange(0, BLOCK)
        in_sel = k < sel_len
        # Which selected cluster holds entry k: the first with running size > k (lower bound).
        lo = tl.zeros([BLOCK], tl.int32)
        hi = tl.zeros([BLOCK], tl.int32) + n_sel
        for _ in range(SEARCH_STEPS):
            active = in_sel & (lo < hi)
            mid = (lo + hi) // 2
            right = tl.load(sel_cum + sel_base + mid, mask=active, other=0) <= k
            lo = tl.where(active & right, mid + 1, lo)
            hi = tl.where(active & ~right, mid, hi)
        cid = tl.load(sel_ids + sel_base + lo, mask=in_sel, other=0)
        end = tl.load(sel_cum + sel_base + lo, mask=in_sel, other=0)
        row = row0 + cid
        size = tl.load(counts + row * stride_nr + h * stride_nh, mask=in_sel, other=0)
        first = tl.load(member_start + row * stride_msr + h * stride_msh, mask=in_sel, other=0)
        member = tl.load(
            members + (first + k - (end - size)).to(tl.int64) * stride_mr + h * stride_mh,
            mask=in_sel,
            other=0,
        )
        tl.store(chosen + b * stride_cb + h * stride_ch + k, member, mask=in_sel)


def ranking_key(importance: torch.Tensor) -> torch.Tensor:
    """Importance truncated to bfloat16 precision (8 significant bits): what clusters are ranked
    by, ties going to the lower cluster id. Half the bits halve the decode kernel's threshold
    search (16 dependent reductions instead of 32), and clusters this close in importance are
    interchangeable for the approximation."""
    bits = importance.float().contiguous().view(torch.int32)
    return (bits & -(1 << 16)).view(torch.float32)
