"""Seed ingestion: sources (files, directories, git checkouts, jsonl) -> license- and quality-filtered
seed documents ``{"id", "text", "path", "source", "language", "licenses", "license"}``.

Modules: sources (listing), license + spdx (license detection and the permissive decision),
language (language detection), quality (quality filters), core (the per-file decision),
cli (``python -m data_tools ingest``). In a pipeline this is the ``ingest`` map stage.
"""
