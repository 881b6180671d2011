"""Data: corpora, tokenizers, token windows and batches (the bottom layer; imports nothing of ours).

- ``corpus``: documents per split, from ``datasets``, a local folder or the embedded default
- ``tokenization``: a local/hub tokenizer or a byte-level BPE trained on the training split
- ``windows``: token streams, training windows and sliding evaluation windows
- ``batch``: teacher-forced token batches (real tokens, targets, original positions)
- ``prepare``: ``prepare_data``, from a corpus to ready batches; ``hold_out_validation``
- ``storage``: atomic writes, so a crash never leaves half a file
"""

from .batch import IGNORE_INDEX, TokenBatch, make_token_batch, unpack_batch
from .corpus import Corpus, byte_token_windows, embedded_documents, load_corpus
from .prepare import PreparedData, hold_out_validation, prepare_data
from .storage import write_json_atomic, write_text_atomic
from .tokenization import load_tokenizer

__all__ = [
    "IGNORE_INDEX",
    "Corpus",
    "PreparedData",
    "TokenBatch",
    "byte_token_windows",
    "embedded_documents",
    "hold_out_validation",
    "load_corpus",
    "load_tokenizer",
    "make_token_batch",
    "prepare_data",
    "unpack_batch",
    "write_json_atomic",
    "write_text_atomic",
]
