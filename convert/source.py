"""`Source`: what a format reader (hf.py, gguf_file.py) hands to the writer."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import numpy as np

from convert.mapping import Rule
from models.config import LlamaConfig


@dataclasses.dataclass
class Source:
    """An opened checkpoint: its config now, its tensors on demand.

    kind: "hf" | "gguf".  table: the conversion table for this config (models/params.py paths).
    load(name): the source tensor `name` as float NumPy, in the source's own layout.
    write_tokenizer(dir): writes tokenizer files into `dir`, returns the file names written.
    info: extra facts recorded in `convert_info.json`.
    """

    kind: str
    path: Path
    config: LlamaConfig
    table: tuple[Rule, ...]
    tensor_names: list[str]
    load: Callable[[str], np.ndarray]
    write_tokenizer: Callable[[Path], list[str]]
    info: dict = dataclasses.field(default_factory=dict)
