"""Sequence parallelism under torchrun: process groups, sharding specs, Ulysses all-to-all, ring
attention, and opt-in timing of the communication (vkern.distributed.timing.CommTimer)."""
from ..reference.sequence_parallel import ShardSpec, shard_sequence, unshard_sequence
from .groups import SPGroup, init_from_env
from .ulysses import (QKVSendBuffer, head_chunks, head_to_seq, key_padding_mask, seq_to_head, seq_to_head_qkv,
                      ulysses_attention, ulysses_attention_packed)
from .ring import ring_attention
from .timing import CommTimer
from .sp_wan import SPConfig, apply_sequence_parallel

__all__ = ["init_from_env", "SPGroup", "ShardSpec", "shard_sequence", "unshard_sequence",
           "seq_to_head", "seq_to_head_qkv", "head_to_seq", "key_padding_mask", "ulysses_attention",
           "ulysses_attention_packed", "QKVSendBuffer",
           "head_chunks", "ring_attention", "CommTimer", "SPConfig", "apply_sequence_parallel"]
