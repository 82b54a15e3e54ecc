"""LServe's sparsity knobs (arXiv 2502.14866), validated once, named as in the paper.

`SparsityConfig` is the one place these settings live: `LLM` takes them as keyword arguments,
`models.attention.AttentionConfig` carries one as its `sparsity` field, and every use (the
prefill Λ window, the decode sink and ring, the page budget and selection, the cache's page
sizes) reads them from there. It is plain frozen, hashable data (part of the static jit
argument), so it lives with the device-side code; `lserve_jax.sparsity` re-exports it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from models.page_selector import MIN_BUDGET_PAGES
from models.streaming_pool import StreamingLayout

PAGE_SELECTIONS = ("kv_head", "query_head")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SparsityConfig:
    """Knobs of LServe's unified sparse attention. Defaults are LServe's, except
    `page_selection` ("kv_head"; LServe selects per query head) and `keep_first_pages` (1;
    LServe's rule is 0), both chosen on measurements (README).

    page_size            physical KV page, tokens
    logical_page_size    page-selector granularity (divides page_size)
    static_sparsity      fraction of KV heads made streaming heads
    ctx_sink_tokens      Λ mask sink for streaming heads in prefill
    ctx_local_tokens     Λ mask local window in prefill (includes the current token)
    dec_sink_tokens      sink kept for streaming heads in decode (multiple of page_size)
    dec_local_tokens     local window kept in decode (multiple of page_size)
    token_budget         tokens attended per dense head per decode step (a multiple of
                         page_size, at least 3 pages: LServe's minimum)
    selector_interval    recompute the page selection every N decode steps
    page_selection       "kv_head": one page list per KV head (the GQA group's query heads
                         combined, each page loaded once per group); "query_head": one per
                         query head, as in LServe
    keep_first_pages     pages at the start (the attention sink) every dense-head selection
                         keeps (0: LServe's rule, top pages by score plus the newest; 1 keeps
                         more passkeys and agrees more with dense on SmolLM2, README)
    head_pattern         DuoAttention `full_attention_heads.tsv` (None: the shipped pattern
                         of the embedded model, every head dense for other checkpoints)

    `page_size` and `logical_page_size` are also the KV cache's: `models.llama.cache_spec`
    builds the cache with them, and LServe-mode attention refuses a cache with others. In
    dense mode only the page sizes are used. Derived values: `budget_pages`,
    `logical_pages_per_page`, `streaming_layout`.
    """

    page_size: int = 64
    logical_page_size: int = 16
    static_sparsity: float = 0.5
    ctx_sink_tokens: int = 128
    ctx_local_tokens: int = 8192
    dec_sink_tokens: int = 128
    dec_local_tokens: int = 256
    token_budget: int = 4096
    selector_interval: int = 4
    page_selection: str = "kv_head"
    keep_first_pages: int = 1
    head_pattern: str | None = None

    def __post_init__(self):
        ints = ("page_size", "logical_page_size", "ctx_sink_tokens", "ctx_local_tokens",
                "dec_sink_tokens", "dec_local_tokens", "token_budget", "selector_interval",
                "keep_first_pages")
        for name in ints:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{name}={value!r} must be an int")
        page_size = self.page_size
        if page_size < 1 or page_size & (page_size - 1):
            raise ValueError(f"{page_size=} must be a positive power of two")
        logical_page_size = self.logical_page_size
        if logical_page_size < 1 or page_size % logical_page_size:
            raise ValueError(f"{logical_page_size=} must be >= 1 and divide {page_size=}")
        if isinstance(self.static_sparsity, bool) or not isinstance(self.static_sparsity,
                                                                    (int, float)):
            raise ValueError(f"static_sparsity={self.static_sparsity!r} must be a number")
        if not 0.0 <= self.static_sparsity <= 1.0:
            raise ValueError(f"static_sparsity={self.static_sparsity!r} must be in [0, 1]")
        if self.ctx_sink_tokens < 0:
            raise ValueError(f"ctx_sink_tokens={self.ctx_sink_tokens} must be >= 0")
        if self.ctx_local_tokens < 1:
            raise ValueError(f"ctx_local_tokens={self.ctx_local_tokens} must be >= 1")
        dec_sink_tokens, dec_local_tokens = self.dec_sink_tokens, self.dec_local_tokens
        if dec_sink_tokens < 0 or dec_sink_tokens % page_size:
            raise ValueError(f"{dec_sink_tokens=} must be a non-negative multiple of {page_size=}")
        if dec_local_tokens < page_size or dec_local_tokens % page_size:
            raise ValueError(f"{dec_local_tokens=} must be a positive multiple of {page_size=}")
        token_budget = self.token_budget
        if token_budget < page_size or token_budget % page_size:
            raise ValueError(f"{token_budget=} must be a positive multiple of {page_size=}")
        if token_budget < MIN_BUDGET_PAGES * page_size:
            raise ValueError(f"{token_budget=} is below LServe's minimum budget of "
                             f"{MIN_BUDGET_PAGES} pages ({MIN_BUDGET_PAGES * page_size} tokens at "
                             f"{page_size=})")
        if self.selector_interval < 1:
            raise ValueError(f"selector_interval={self.selector_interval} must be >= 1")
        if not 0 <= self.keep_first_pages < self.budget_pages:
            raise ValueError(f"keep_first_pages={self.keep_first_pages} must be in "
                             f"[0, {self.budget_pages - 1}] (the budget is {self.budget_pages} pages)")
        if self.page_selection not in PAGE_SELECTIONS:
            raise ValueError(f"page_selection={self.page_selection!r} must be one of "
                             f"{PAGE_SELECTIONS}")
        if self.head_pattern is not None:
            path = Path(self.head_pattern)
            if not path.is_file():
                raise FileNotFoundError(f"head_pattern file not found: {path}")
            object.__setattr__(self, "head_pattern", str(path))

    @property
    def logical_pages_per_page(self) -> int:
        return self.page_size // self.logical_page_size

    @property
    def streaming_layout(self) -> StreamingLayout:
        """Streaming-head pages per sequence in decode: sink pages + ring (LServe §4)."""
        return StreamingLayout(page_size=self.page_size, sink_tokens=self.dec_sink_tokens,
                               local_tokens=self.dec_local_tokens)

    @property
    def budget_pages(self) -> int:
        """Pages a dense head attends per decode step (LServe, arXiv 2502.14866)."""
        return self.token_budget // self.page_size

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))
