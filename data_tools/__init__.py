"""Offline data toolkit: from permissively licensed source code to Megatron's tokenized format.

The three stages, each a console script and a ``python -m`` module with a programmatic twin:

1. ``mcode-seed-corpus`` (:func:`data_tools.seed_corpus.build_seed_corpus`): walks a local
   directory of permissively licensed code (by default the Python standard library, PSF-2.0)
   and writes one JSON object per file: ``{"text", "path", "source", "license"}``.
2. ``mcode-train-tokenizer`` (:func:`data_tools.train_tokenizer.train_tokenizer`): trains a
   byte-fallback BPE sentencepiece model for code from jsonl files. Ids 0-3 are
   ``<unk> <s> </s> <pad>``; ``</s>`` is the end-of-document (EOD) token.
3. ``mcode-preprocess-data`` (:func:`data_tools.preprocess_data.preprocess_data`): tokenizes a
   jsonl file into megatron-core's indexed ``.bin``/``.idx`` pair that
   ``megatron.core.datasets`` (GPTDataset, BlendedMegatronDatasetBuilder) reads.

The synthetic-data side (``python -m data_tools <command>``, see ``data_tools/__main__.py``):
``ingest`` (license/quality/language-filtered seeds), ``dedup``, ``decontaminate``, ``report``,
``export`` (pretraining/SFT/DPO files), and ``pipeline``, which runs them as a YAML recipe of
sharded stages on local processes, Slurm or Ray (:mod:`data_tools.pipeline`).

Every command validates its inputs before expensive work, writes outputs to temporary files
in the destination directory and renames them into place only on success, and refuses to
replace existing outputs unless ``--overwrite`` is given. See docs/data_tools.md.
"""
