"""The toolkit where researchers already evaluate: an lm-evaluation-harness model
(``lm_eval_model``, with the optional extra ``[eval]``) and local harness tasks over data that
ships with Python (``tasks``)."""
