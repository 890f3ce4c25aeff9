"""Modules: candidate operations and the supernet edges."""
from .edges import AttentionMixedOp, ChannelAttention, MixedOp, PartialMixedOp, channel_shuffle, select_channels
from .fused import FusedAttentionMixedOp, FusedFactorizedReduce, FusedReLUConvBN
from .operations import OPS, PRIMITIVES, make_op, make_search_op
from .recompute import recompute_edge

__all__ = [
    "AttentionMixedOp", "FusedAttentionMixedOp", "ChannelAttention", "MixedOp", "PartialMixedOp", "channel_shuffle", "select_channels",
    "FusedFactorizedReduce", "FusedReLUConvBN", "recompute_edge",
    "OPS", "PRIMITIVES", "make_op", "make_search_op",
]
