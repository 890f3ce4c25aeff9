"""Modules: candidate operations and the supernet edges."""
from .edges import AttentionMixedOp, ChannelAttention, MixedOp, PartialMixedOp, channel_shuffle, select_channels
from .fused import FusedAttentionMixedOp
from .operations import OPS, PRIMITIVES, make_op, make_search_op

__all__ = [
    "AttentionMixedOp", "FusedAttentionMixedOp", "ChannelAttention", "MixedOp", "PartialMixedOp", "channel_shuffle", "select_channels",
    "OPS", "PRIMITIVES", "make_op", "make_search_op",
]
