"""Text data for lens training: document sources, the built-in stdlib corpus, packing into
fixed-length token sequences, self-distillation and AlpacaEval prompts."""

from lensforge.data.instructions import BUILTIN_INSTRUCTIONS, alpaca_instructions, format_chat
from lensforge.data.packing import PackedTokenStream, split_text
from lensforge.data.selfgen import generate_documents
from lensforge.data.sources import SUPPORTED_SUFFIXES, iter_documents, list_data_files
from lensforge.data.stdlib_corpus import is_heldout, stdlib_document_names, stdlib_documents

__all__ = [
    "BUILTIN_INSTRUCTIONS",
    "SUPPORTED_SUFFIXES",
    "PackedTokenStream",
    "alpaca_instructions",
    "format_chat",
    "generate_documents",
    "is_heldout",
    "iter_documents",
    "list_data_files",
    "split_text",
    "stdlib_document_names",
    "stdlib_documents",
]
