"""Sequence-parallel (Ulysses) layouts, the spec for vkern/distributed/ulysses.py, in one process.

A sequence of S tokens is padded to S_padded (a multiple of world) and split into equal contiguous
shards of S_padded / world tokens: rank r holds padded positions [r * S_local, (r + 1) * S_local),
so the padding is the tail of the last ranks. Heads are padded with zero heads to H_padded (a
multiple of world); after the sequence->head all-to-all, rank r holds the whole padded sequence for
heads [r * H_local, (r + 1) * H_local). Padding sits at the end of both axes, so a key is padding
exactly when its position is >= seq_len (key_padding_mask), and padded heads are simply dropped.
"""
from dataclasses import dataclass

import torch


def round_up(n, world):
    """The smallest multiple of world that is >= n."""
    return -(-n // world) * world


@dataclass(frozen=True)
class ShardSpec:
    """How one attention call is laid out over `world` ranks. Build it with ShardSpec.create."""
    seq_len: int
    padded_seq_len: int
    heads: int
    padded_heads: int
    world: int

    @classmethod
    def create(cls, seq_len, heads, world):
        for name, value in (("seq_len", seq_len), ("heads", heads), ("world", world)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        return cls(seq_len, round_up(seq_len, world), heads, round_up(heads, world), world)

    def __post_init__(self):
        if self.world <= 0:
            raise ValueError(f"world: expected a positive int, got {self.world!r}")
        for name, real, padded in (("seq_len", self.seq_len, self.padded_seq_len),
                                   ("heads", self.heads, self.padded_heads)):
            if real <= 0 or padded != round_up(real, self.world):
                raise ValueError(f"padded_{name}: expected {name}={real} rounded up to a multiple of "
                                 f"world={self.world} ({round_up(real, self.world)}), got {padded}")

    @property
    def local_seq_len(self):
        """Tokens per rank before the all-to-all (padding included)."""
        return self.padded_seq_len // self.world

    @property
    def local_heads(self):
        """Heads per rank after the all-to-all (padding included)."""
        return self.padded_heads // self.world

    def real_tokens(self, rank):
        """How many of rank's S_local tokens are real (the rest is padding)."""
        return min(max(self.seq_len - rank * self.local_seq_len, 0), self.local_seq_len)


def _pad_dim(x, dim, size):
    """x with zeros appended along dim up to `size`."""
    extra = size - x.shape[dim]
    if extra == 0:
        return x
    zeros_shape = list(x.shape)
    zeros_shape[dim] = extra
    return torch.cat([x, x.new_zeros(zeros_shape)], dim)


def _check_rank(rank, world):
    if not 0 <= rank < world:
        raise ValueError(f"rank: expected 0 <= rank < world={world}, got {rank}")


def shard_sequence(x, world, rank, dim=1):
    """Rank's shard of x along dim: ceil(S / world) tokens, zero-padded where S runs out."""
    _check_rank(rank, world)
    local = round_up(x.shape[dim], world) // world
    return _pad_dim(x, dim, local * world).narrow(dim, rank * local, local)


def unshard_sequence(shards, seq_len, dim=1):
    """The inverse of shard_sequence: concatenate the ranks' shards and drop the padding."""
    return torch.cat(list(shards), dim).narrow(dim, 0, seq_len)


def pad_heads(x, world):
    """x [B, S, H, D] with zero heads appended up to a multiple of world."""
    return _pad_dim(x, 2, round_up(x.shape[2], world))


def seq_to_head_reference(full_x, world, rank):
    """What rank holds after the sequence->head all-to-all of full_x [B, S, H, D] (the whole,
    unpadded tensor): [B, S_padded, H_padded / world, D], zeros at padded positions and heads."""
    _check_rank(rank, world)
    spec = ShardSpec.create(full_x.shape[1], full_x.shape[2], world)
    padded = _pad_dim(pad_heads(full_x, world), 1, spec.padded_seq_len)
    return padded.narrow(2, rank * spec.local_heads, spec.local_heads)


def head_to_seq_reference(full_y, world, rank, heads):
    """What rank holds after the head->sequence all-to-all, when rank j held heads
    [j * H_local, (j + 1) * H_local) of full_y [B, S_padded, H_padded, D] (the ranks' head shards
    side by side): [B, S_local, heads, D], padded heads dropped, padded positions kept."""
    _check_rank(rank, world)
    B, S, H, D = full_y.shape
    if S % world or H % world or not 0 < heads <= H:
        raise ValueError(f"full_y: expected [B, S_padded, H_padded, D] with S_padded and H_padded "
                         f"multiples of world={world} and heads={heads} <= H_padded, got {tuple(full_y.shape)}")
    return shard_sequence(full_y, world, rank)[:, :, :heads]


def key_padding_mask(spec, device=None):
    """bool [S_padded], True = real token: keys at False positions must never be attended."""
    return torch.arange(spec.padded_seq_len, device=device) < spec.seq_len
