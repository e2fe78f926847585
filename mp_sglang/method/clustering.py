"""How the method cuts keys into k-means blocks and clusters, and seeds its k-means.

The k-means itself (Lloyd iterations, batched over heads) is on the kernels' floor:
`mp_kernels.kmeans_reference` in torch, `mp_kernels.kmeans` in Triton.
"""

from __future__ import annotations

import torch


def block_sizes(num_tokens: int, block: int) -> list[int]:
    """Split `num_tokens` into k-means blocks of `block` keys; the final block holds [block/2, 3/2 block).

    A short remainder joins the final block rather than forming a poorly clustered block of its own.
    """
    full, rem = divmod(num_tokens, block)
    if 0 < rem < block // 2 and full > 0:
        full, rem = full - 1, rem + block
    return [block] * full + ([rem] if rem else [])


def clusters_for(num_tokens: int, tokens_per_cluster: int) -> int:
    """How many clusters a block of `num_tokens` keys gets (at least one)."""
    return max(1, num_tokens // tokens_per_cluster)


def max_clusters(clustered: int, tokens_per_cluster: int, kmeans_block: int) -> int:
    """The most clusters an index of at most `clustered` tokens holds, however its blocks fell.

    Each block gets `clusters_for` its size, which rounds down except that a block shorter than
    `tokens_per_cluster` still gets one. Blocks are at least `kmeans_block // 2` tokens long
    (`block_sizes`), except a request's first block while the request is short, so with the usual
    settings at most one block rounds up.
    """
    short_blocks = 1
    if kmeans_block // 2 < tokens_per_cluster:
        short_blocks += -(-clustered // max(1, kmeans_block // 2))
    return max(0, clustered) // tokens_per_cluster + short_blocks


def seeded(seed: int, salt: int) -> torch.Generator:
    """A (CPU) generator fixed by the config's seed and a position, so equal inputs cluster equally."""
    return torch.Generator().manual_seed((seed * 1_000_003 + salt) % (1 << 63))
