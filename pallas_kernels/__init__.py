"""Pallas GPU kernels (Triton style) with their plain-jnp references; no imports from above."""

from pallas_kernels.sparse_prefill import default_prefill_config as default_prefill_config
from pallas_kernels.sparse_prefill import prefill_mask as prefill_mask
from pallas_kernels.sparse_prefill import prefill_tile_counts as prefill_tile_counts
from pallas_kernels.sparse_prefill import sparse_prefill_attention as sparse_prefill_attention
from pallas_kernels.sparse_prefill import (
    sparse_prefill_attention_reference as sparse_prefill_attention_reference,
)
from pallas_kernels.paged_decode import paged_decode_attention as paged_decode_attention
from pallas_kernels.paged_decode import (
    paged_decode_attention_reference as paged_decode_attention_reference,
)
from pallas_kernels.paged_decode import default_num_splits as default_num_splits
from pallas_kernels.paged_decode import pooled_decode_attention as pooled_decode_attention
from pallas_kernels.paged_decode import (
    pooled_decode_attention_reference as pooled_decode_attention_reference,
)
from pallas_kernels.paged_prefill import paged_prefill_attention as paged_prefill_attention
from pallas_kernels.paged_prefill import (
    paged_prefill_attention_reference as paged_prefill_attention_reference,
)
from pallas_kernels.page_select import MAX_SELECT_PAGES as MAX_SELECT_PAGES
from pallas_kernels.page_select import page_scores as page_scores
from pallas_kernels.page_select import page_scores_reference as page_scores_reference
from pallas_kernels.page_select import select_top_pages as select_top_pages
from pallas_kernels.page_select import (
    select_top_pages_reference as select_top_pages_reference,
)
from pallas_kernels.kv_append import append_tokens as append_tokens
from pallas_kernels.kv_append import append_tokens_reference as append_tokens_reference
