"""Modules: candidate operations and the supernet edges."""
from .batchnorm import batch_norm_keep_output, batchnorm_mode, update_running_stats
from .edges import (AttentionMixedOp, Candidates, ChannelAttention, MixedOp, PartialMixedOp, channel_shuffle,
                    check_edge_input, check_k, select_channels)
from .fused import FusedAttentionMixedOp, FusedCandidates, FusedFactorizedReduce, FusedReLUConvBN
from .operations import OPS, PRIMITIVES, make_op, make_search_op
from .recompute import ReplayableEdge, recompute_edge
from .selection import ChannelSelectingEdge, ChannelSelector, local_selector, selects_channels

__all__ = [
    "AttentionMixedOp", "FusedAttentionMixedOp", "ChannelAttention", "MixedOp", "PartialMixedOp", "channel_shuffle",
    "select_channels", "ChannelSelector", "ChannelSelectingEdge", "local_selector", "selects_channels",
    "Candidates", "FusedCandidates", "check_edge_input", "check_k",
    "FusedFactorizedReduce", "FusedReLUConvBN", "ReplayableEdge", "recompute_edge",
    "batch_norm_keep_output", "batchnorm_mode", "update_running_stats",
    "OPS", "PRIMITIVES", "make_op", "make_search_op",
]
