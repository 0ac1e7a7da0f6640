"""Runtime operations that the passes insert into the rewritten graph, one module per kind.

Each takes packed features ``(T, C)`` plus the ``Sites`` they live on, and computes at the visible positions what
the dense op computes under masked-dense semantics. Weights arrive as the source model's own Parameters (graph
inputs), so the converted model shares every Parameter with it.
"""

from .channels import channel_gather, channel_op, channel_slice, channel_split, stack_columns
from .conv import (
    conv_per_unit,
    folded_depthwise_conv,
    image_sparse_conv,
    neighbours,
    patch_embed,
    pointwise_conv,
    space_to_depth,
    sparse_conv,
)
from .pooling import avg_pool, cell_reduce, max_pool, mean_pool, sample_mean, sample_reduce
from .rows import (
    constant_prefix_rows,
    gather_constant,
    gather_window_map,
    green_output,
    grid_rows,
    join_prefix,
    map_rows,
    move_rows,
    position_einsum,
    prefix_rows,
    scatter_dense,
    tokens,
)
from .samples import (
    dropout_noise,
    from_padded_dense,
    mul_per_sample,
    per_sample_creation,
    per_sample_factory,
    recompute,
    sample_to_tokens,
    to_padded_dense,
)
