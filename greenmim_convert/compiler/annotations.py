"""The protocol between passes: typed facts on nodes (``NodeFacts``) and named properties of the graph (``Property``).

Every fact a pass records on a node for a later pass is a field of ``NodeFacts``, stored under the one
``node.meta`` key ``KEY``; torch's own keys (``val``, ``nn_module_stack``, ``stack_trace``, ...) stay as they are.
Read facts with ``peek(node)`` (an empty read-only record when the node has none), write them through
``facts(node)`` (created on first write), and give a node that replaces another its facts with ``copy_meta``.
Layout analysis and its rules (``passes/rules.py``) write the facts; the rewriting passes read them.
A pass states the graph properties it ``requires`` and ``ensures``; the pipeline refuses an order that breaks them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, NamedTuple, Optional, Set, Tuple

import torch.fx as fx

from greenmim_convert.compiler.layout import Layout

KEY = "greenmim"

Pair = Tuple[int, int]


class Property(enum.Enum):
    """A property of the whole graph that a pass ensures and later passes may require."""

    FUNCTIONAL = "functional"  # no in-place op writes an image value or a per-sample draw
    CANONICAL = "canonical"  # one ATen spelling per operation
    TABLE_ROWS = "table-rows"  # image-independent ``table[index]`` reads rows with ``index_select``
    EINSUMS_SPLIT = "einsums-split"  # an einsum of two image values is permutes, views and ``bmm``
    LAYOUTS = "layouts"  # every image value carries its layout and the facts of the rule that matched it
    OUTPUTS = "outputs"  # the graph returns the chosen outputs only; failures they depend on were raised
    DENSE_ISLANDS = "dense-islands"  # maps broadcast over windows are computed densely, read per token
    CONVS = "convs"  # convolutions run on visible sites
    POOLS = "pools"  # pooling and grid reductions run over visible positions
    POSITION_EINSUMS = "position-einsums"  # einsums with position-indexed tables are per-token products
    ATTENTION = "attention"  # attention regions are single runtime attention calls
    SAMPLE_MATMULS = "sample-matmuls"  # matmuls summing over a sample's tokens run on per-sample padded tensors
    PATCH_MERGES = "patch-merges"  # space-to-depth, strided merges and subsamplings gather onto coarser grids
    CHANNEL_SPLITS = "channel-splits"  # splits and stacks over channel digits are column slices and gathers
    PREFIX_TOKENS = "prefix-tokens"  # class-token cats and slices are row operations
    GRID_PADDING = "grid-padding"  # pads and crops of the grid are row moves
    TOKENWISE = "tokenwise"  # token-wise ops broadcast on packed rows as they did densely
    NO_LAYOUT_OPS = "no-layout-ops"  # views, permutes, rolls and the other layout ops are removed
    RECOMPUTED = "recomputed"  # large image-independent subgraphs and dense islands recompute in backward


# What the rewriting passes ensure: all of them read layouts through the layout ops, so they run before those go.
REWRITES = frozenset(
    {
        Property.DENSE_ISLANDS,
        Property.CONVS,
        Property.POOLS,
        Property.POSITION_EINSUMS,
        Property.ATTENTION,
        Property.SAMPLE_MATMULS,
        Property.PATCH_MERGES,
        Property.CHANNEL_SPLITS,
        Property.PREFIX_TOKENS,
        Property.GRID_PADDING,
        Property.TOKENWISE,
    }
)


@dataclass(frozen=True)
class Pick:
    """A strided spatial slice of ``src``: every ``factor``-th row/col starting at ``offset``."""

    src: fx.Node
    factor: Dict[str, int] = field(hash=False)
    offset: Dict[str, int] = field(hash=False)


class Subsample(NamedTuple):
    """Picked cells read as the tokens of a coarser grid."""

    coarse: Layout
    factor: int
    offset: Pair


class StridedMerge(NamedTuple):
    """Strided slices of ``src`` concatenated along the channels: a space-to-depth by ``factor``."""

    src: fx.Node
    fine: Layout
    coarse: Layout
    factor: Pair
    offsets: List[Pair]


class SpaceToDepth(NamedTuple):
    """Low spatial digits of the last axis gathered into channels (``compiler.layout.space_to_depth_plan``)."""

    fine: Layout
    coarse: Layout
    factor: Pair
    features: List[Tuple[int, int, int]]  # per new feature: (dh, dw, channel) it reads


class DenseIsland(NamedTuple):
    """The nodes computing a map broadcast over windows, the token maps they start from, their axes' order."""

    nodes: Set[fx.Node]
    boundary: List[fx.Node]
    axes: Tuple[int, ...]


class GridMove(NamedTuple):
    """A pad (or crop) of the grid: the shift of the rows and columns, and the pad value."""

    shift: Pair
    fill: float


class CellReduction(NamedTuple):
    """A reduction over the visible positions of each ``factor`` x ``factor`` cell."""

    kind: str
    factor: int


class SpatialReduction(NamedTuple):
    """A reduction over the whole grid of each sample, and over the channel ``digits`` of ``sizes`` too."""

    sizes: List[int]
    digits: List[int]


class MaxPool(NamedTuple):
    kernel: Pair
    stride: Pair
    padding: Tuple[int, ...]
    dilation: Pair


class AvgPool(NamedTuple):
    kernel: Pair
    stride: Pair
    padding: Pair
    count_include_pad: bool
    divisor: Optional[int]


class QueryTerm(NamedTuple):
    """A token-valued term added to attention logits, read per (query, key) through the ``keys`` digits."""

    operand: fx.Node
    keys: Tuple[Any, ...]  # (channel atom, key atom) pairs
    swap: bool  # the term is the op's first operand


class PrefixSlice(NamedTuple):
    """A slice of a token axis holding prefix tokens: ``part`` is ``"grid"`` or ``"prefix"``."""

    part: str
    count: int


@dataclass
class NodeFacts:
    """What the passes know about one node; every field defaults to "not known" (None or False).

    Fields are grouped by the rule that writes them (layout analysis, unless said otherwise).
    """

    # layout analysis
    layout: Optional[Layout] = None  # symbolic layout of a value computed from the images
    layout_op: bool = False  # a layout-only op: removed by the layout-ops pass once layouts are read
    image: bool = False  # the images, or a view or zero pad of them
    dense: bool = False  # inside a dense island: runs unchanged on dense maps (set by ``dense_island.settle``)
    # dense-island rule
    dense_island: Optional[DenseIsland] = None  # on the broadcast over windows
    # patch-merging rules
    pick: Optional[Pick] = None  # a strided slice of rows or columns, waiting for the other axis or a cat
    subsample: Optional[Subsample] = None
    strided_merge: Optional[StridedMerge] = None
    channel_cat: bool = False  # a cat along the channels of ordinary tokens
    # token-wise rule (``space_to_depth`` is read by patch merging)
    space_to_depth: Optional[SpaceToDepth] = None
    channel_permute: Optional[Tuple[int, ...]] = None  # packed columns in the order of the last axis
    minor_norm: Optional[int] = None  # layer_norm over the minor channel digits of this size (per head)
    per_sample_creation: bool = False  # ``torch.rand((B, 1, ...))``: one fresh value per sample
    per_sample_factory: bool = False  # ``x.new_empty((B, 1, ...))``
    elementwise: bool = False
    channel_reduction: bool = False  # a reduction or softmax over channel digits
    # channel-split rule
    parts: Optional[List[Tuple[Layout, List[int]]]] = None  # a multi-output split: each part's layout, columns
    columns: Optional[List[int]] = None  # the packed columns a part reads
    new_digit: Optional[int] = None  # a stack: the place value of the new channel digit
    # grid-padding and layout-ops rules
    grid_move: Optional[GridMove] = None
    absorbed_pad: Optional[Tuple[int, int, int, int]] = None  # a pad the reading conv or max pool takes over
    # pooling rule
    spatial_mean: bool = False
    spatial_reduction: Optional[SpatialReduction] = None
    cell_reduction: Optional[CellReduction] = None
    max_pool: Optional[MaxPool] = None
    avg_pool: Optional[AvgPool] = None
    # attention rule
    sample_matmul: bool = False  # a matmul summing over a sample's tokens (or a per-sample matrix times tokens)
    attention_qk: Optional[Tuple[fx.Node, fx.Node]] = None  # logits ``q @ kᵀ``: the query and the key operand
    attention_pv: bool = False  # probabilities ``@ v``: the end of a matmul attention region
    attention_sdpa: Optional[Layout] = None  # ``scaled_dot_product_attention``: its pair layout
    query_term: Optional[QueryTerm] = None
    # prefix-tokens rule
    prefix_slice: Optional[PrefixSlice] = None
    prefix_cat: Optional[List[Optional[tuple]]] = None  # per part before the grid: constant-token spec or None
    block_scatter: Optional[int] = None  # slice_scatter into the grid part of this token axis of the logits


class _ReadOnly(NodeFacts):
    """The empty record ``peek`` returns for a node without facts: writing to it is a bug."""

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"cannot set {name} on a node's empty facts: write through facts(node)")


EMPTY = _ReadOnly.__new__(_ReadOnly)
EMPTY.__dict__.update(vars(NodeFacts()))


def facts(node: fx.Node) -> NodeFacts:
    """The node's facts for writing, created on first use."""
    found = node.meta.get(KEY)
    if found is None:
        found = node.meta[KEY] = NodeFacts()
    return found


def peek(node: Any) -> NodeFacts:
    """The node's facts for reading: ``EMPTY`` for a node without any, or for anything that is not a node."""
    return node.meta.get(KEY, EMPTY) if isinstance(node, fx.Node) else EMPTY


def copy_meta(src: fx.Node, dst: fx.Node, **changes: Any) -> None:
    """``dst`` takes ``src``'s meta: torch's keys, and its own copy of the facts with ``changes`` applied."""
    dst.meta.update(src.meta)
    found = src.meta.get(KEY)
    if found is not None:
        dst.meta[KEY] = replace(found, **changes)


def forget(node: fx.Node, **keep: Any) -> NodeFacts:
    """Drop every fact of ``node`` (layout analysis is the first pass to record any); set ``keep``."""
    node.meta[KEY] = NodeFacts(**keep)
    return node.meta[KEY]
