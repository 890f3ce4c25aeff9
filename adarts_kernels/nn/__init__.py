"""Modules: candidate operations and the supernet edges."""
from .edges import AttentionMixedOp, ChannelAttention, MixedOp, PartialMixedOp, channel_shuffle, select_channels
from .operations import OPS, PRIMITIVES, make_op, make_search_op

__all__ = [
    "AttentionMixedOp", "ChannelAttention", "MixedOp", "PartialMixedOp", "channel_shuffle", "select_channels",
    "OPS", "PRIMITIVES", "make_op", "make_search_op",
]
