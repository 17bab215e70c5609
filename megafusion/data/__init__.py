"""Data: documents -> tokens -> packed rows -> microbatches. Built-in sets (``builtin/``), shards and
the indexed format (``formats/``), tokenizers and image codecs, packing, the sample index, streaming,
blends, In-Context Pretraining order, and the library behind ``megafusion data`` (``prepare``,
``icp_rewrite``, ``index_build``); ``sources.build_data`` turns a config into a run's data."""
