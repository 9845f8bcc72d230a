"""Every random choice of the package, keyed by (seed, epoch, step, stream or global id).

Nothing here reads the global torch or numpy RNG, so all ranks draw the same numbers, any
number of ranks draws what one process would, and a resumed run continues the same stream:

* :func:`make_generator` -- a torch.Generator per (seed, epoch, step, stream name): dropout,
  init, batch order, baselines;
* :func:`block_uniform` -- dropout uniforms per block of global rows (a rank draws only the
  blocks its rows fall in);
* :func:`uniform_hash` -- a counter-based uniform per integer key (edges of the random views).
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

def make_generator(seed: int, epoch: int, step: int, stream: str, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch.Generator seeded from a hash of (seed, epoch, step, stream): identical on every
    rank, independent across streams ("dropout", "views", "batch", ...)."""
    h = hashlib.blake2b(f"{int(seed)}|{int(epoch)}|{int(step)}|{stream}".encode(), digest_size=8).digest()
    g = torch.Generator(device=device)
    g.manual_seed(int.from_bytes(h, "little") & ((1 << 63) - 1))
    return g


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator of every random choice of ``epoch`` (depends only on seed, epoch)."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(epoch) + 1) % (2 ** 63))


MASK_BLOCK_ROWS = 2048  # global rows per independently seeded block of a dropout mask
_M64 = (1 << 64) - 1


def _block_seed(base: int, side: int, block: int) -> int:
    """splitmix64 of (base, side, block): the seed of one mask block."""
    x = (base + 0x9E3779B97F4A7C15 * (2 * block + side + 1)) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return (x ^ (x >> 31)) & ((1 << 63) - 1)


def block_uniform(head: tuple[int, ...], ids: torch.Tensor, n_total: int, d: int, base: int, side: int,
                  device) -> torch.Tensor:
    """Uniform [0, 1) draws of shape ``head + [len(ids), d]`` whose rows depend only on
    (base, side, global row id): global rows are cut into blocks of ``MASK_BLOCK_ROWS``, each
    drawn from its own generator, so a rank draws only the blocks its rows fall in (its item
    slice: about 1/P of them) and the masks do not depend on the number of ranks."""
    B = MASK_BLOCK_ROWS
    ax = len(head)
    ids = ids.to(torch.int64).cpu()
    if ids.numel() == 0:
        return torch.empty(head + (0, d), device=device)
    blk = ids // B
    blocks = torch.unique(blk).tolist()
    parts, offs = [], torch.zeros(blocks[-1] + 1, dtype=torch.int64)
    pos = 0
    for b in blocks:
        n_b = min(B, n_total - b * B)
        g = torch.Generator(device=device).manual_seed(_block_seed(base, side, b))
        parts.append(torch.rand(head + (n_b, d), generator=g, device=device))
        offs[b] = pos
        pos += n_b
    cat = parts[0] if len(parts) == 1 else torch.cat(parts, ax)
    idx = offs[blk] + ids % B
    if idx.numel() == pos and bool(torch.equal(idx, torch.arange(pos))):
        return cat
    return cat.index_select(ax, idx.to(cat.device))


def uniform_hash(keys: np.ndarray, seed: int, epoch: int, stream: int) -> np.ndarray:
    """Counter-based uniform [0, 1) per key (splitmix64): the same for an edge whatever rank
    holds it, so random views do not depend on the partition."""
    with np.errstate(over="ignore"):
        x = keys.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        x ^= np.uint64((seed * 1_000_003 + epoch * 7919 + stream * 104_729) & 0xFFFFFFFFFFFFFFFF)
        x += np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
