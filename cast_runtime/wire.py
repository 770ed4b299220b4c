"""Conversions between cast_core's types and their proto messages, shared by every service."""

from __future__ import annotations

import numpy as np

from cast.v1 import common_pb2
from cast_core.cost_table import CostTable
from cast_core.tree import TokenTree


def tree_to_proto(tree: TokenTree) -> common_pb2.TokenTree:
    return common_pb2.TokenTree(
        tokens=tree.tokens.tolist(), parents=tree.parents.tolist(), depths=tree.depths.tolist(), values=tree.values.tolist()
    )


def tree_from_proto(msg: common_pb2.TokenTree, field: str = "tree", validate: bool = True) -> TokenTree:
    return TokenTree.from_lists(msg.tokens, msg.parents, msg.depths, msg.values, field=field, validate=validate)


def cost_table_to_proto(table: CostTable) -> common_pb2.CostTable:
    return common_pb2.CostTable(
        device=table.device,
        model_id=table.model_id,
        dtype=table.dtype,
        batch_sizes=table.batch_sizes,
        context_buckets=table.context_buckets,
        token_counts=table.token_counts,
        millis=np.asarray(table.millis).ravel().tolist(),
    )


def cost_table_from_proto(msg: common_pb2.CostTable) -> CostTable | None:
    """None when the replica sent no table."""
    if not msg.millis:
        return None
    shape = (len(msg.batch_sizes), len(msg.context_buckets), len(msg.token_counts))
    return CostTable(
        device=msg.device,
        model_id=msg.model_id,
        dtype=msg.dtype,
        batch_sizes=list(msg.batch_sizes),
        context_buckets=list(msg.context_buckets),
        token_counts=list(msg.token_counts),
        millis=np.asarray(msg.millis, dtype=np.float64).reshape(shape),
    )
