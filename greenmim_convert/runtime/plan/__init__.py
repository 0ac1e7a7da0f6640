"""The plan of one forward: the visible sites of every grid, and the windows' tokens packed into groups.

``visible`` -> ``Sites`` (``sites.py``) -> window segments and their DP packing (``packing.py``) into groups of
equal size -> ``Grouping`` (``grouping.py``), which the attention kernels read.
"""

from .grouping import CALL_OVERHEAD_LOGITS, Bucket, Grouping, digit_grouping, group_segments, window_grouping
from .sites import PrefixedSites, Sites, padded_sites, picked_sites, prefixed_sites, visible_sites
