"""Hugging Face export / import (tools/export_hf.py, tools/import_hf.py; docs/huggingface.md).

Nothing here imports transformers; safetensors / tokenizers are imported where files are
written or read (``pip install -e ".[hf]"``).
"""
from .mapping import HFMappingError

__all__ = ["HFMappingError"]
