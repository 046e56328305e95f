"""Sequence parallelism under torchrun: process groups, sharding specs and Ulysses all-to-all."""
from ..reference.sequence_parallel import ShardSpec, shard_sequence, unshard_sequence
from .groups import SPGroup, init_from_env
from .ulysses import head_to_seq, key_padding_mask, seq_to_head, seq_to_head_qkv
from .sp_wan import SPConfig, apply_sequence_parallel

__all__ = ["init_from_env", "SPGroup", "ShardSpec", "shard_sequence", "unshard_sequence",
           "seq_to_head", "seq_to_head_qkv", "head_to_seq", "key_padding_mask",
           "SPConfig", "apply_sequence_parallel"]
