"""Data: corpora, tokenizers, token windows and batches (the bottom layer; imports nothing of ours).

- ``corpus``: documents per split, from ``datasets``, a local folder or the embedded default
- ``tokenization``: a local/hub tokenizer or a byte-level BPE trained on the training split
- ``windows``: token streams, training windows and sliding evaluation windows
- ``batch``: teacher-forced token batches (real tokens, targets, original positions)
- ``prepare``: ``prepare_data``, from a corpus to ready batches; ``hold_out_validation``
- ``storage``: atomic writes, so a crash never leaves half a file
"""

from cascade_bench import lazy_exports

# public names load from their modules on first use (PEP 562): importing the package imports no torch
__all__, __getattr__, __dir__ = lazy_exports(
    __name__,
    {
        ".batch": ("IGNORE_INDEX", "TokenBatch", "make_token_batch", "unpack_batch"),
        ".corpus": ("Corpus", "byte_token_windows", "embedded_documents", "load_corpus"),
        ".prepare": ("PreparedData", "hold_out_validation", "prepare_data"),
        ".storage": ("write_json_atomic", "write_text_atomic"),
        ".tokenization": ("load_tokenizer",),
    },
)
