"""Seed ingestion: license detection (files, headers, SPDX expressions), language detection,
quality filters and their counts, git checkouts and jsonl sources."""
from __future__ import annotations

import collections
import json
import os
import subprocess
import sysconfig

import pytest

from data_tools._common import DataToolError
from data_tools.ingest import cli as ingest_cli
from data_tools.ingest.core import IngestConfig, ingest_entries, plan_ingest
from data_tools.ingest.language import detect_language
from data_tools.ingest.license import LicenseConfig, decide_license, detect_in_text, license_file_ids
from data_tools.ingest.quality import QualityConfig, quality_rejection
from data_tools.ingest.sources import SourceConfig
from data_tools.ingest.spdx import parse_expression

MIT_TEXT = """MIT License

Copyright (c) 2024 Example Authors

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND.
"""
BSD3_TEXT = """Copyright (c) 2020, Someone
Redistribution and use in source and binary forms, with or without
modification, are permitted provided that the following conditions are met:
1. Redistributions of source code must retain the above copyright notice.
2. Redistributions in binary form must reproduce the above copyright notice.
3. Neither the name of the copyright holder nor the names of its
   contributors may be used to endorse or promote products derived from
   this software without specific prior written permission.
"""
GPL3_HEADER = """# This program is free software: you can redistribute it and/or modify
# it under the terms of the GNU General Public License as published by
# the Free Software Foundation, either version 3 of the License, or
# (at your option) any later version.
"""
APACHE_HEADER = """// Licensed under the Apache License, Version 2.0 (the "License");
// you may not use this file except in compliance with the License.
"""
GPL3_LICENSE_FILE = "GNU GENERAL PUBLIC LICENSE\n   Version 3, 29 June 2007\n\n Everyone is permitted to copy..."
PY_BODY = "def add(first, second):\n    \"\"\"Return the sum.\"\"\"\n    return first + second\n"


def test_license_texts_are_recognized():
    assert detect_in_text(MIT_TEXT) == {"MIT"}
    assert detect_in_text(BSD3_TEXT) == {"BSD-3-Clause"}
    assert detect_in_text(BSD3_TEXT.split("3. Neither")[0]) == {"BSD-2-Clause"}
    assert detect_in_text(GPL3_HEADER) == {"GPL-3.0"}
    assert detect_in_text(APACHE_HEADER) == {"Apache-2.0"}
    assert detect_in_text(GPL3_LICENSE_FILE) == {"GPL-3.0"}
    assert detect_in_text(MIT_TEXT.replace("The above copyright notice and this permission notice shall be included",
                                           "")) == {"MIT-0"}
    assert detect_in_text("def f():\n    return 1\n") == set()
    assert license_file_ids("Some custom terms nobody has heard of.") == {"LicenseRef-unrecognized"}


def test_python_license_is_one_composite_not_its_parts():
    with open(os.path.join(sysconfig.get_paths()["stdlib"], "LICENSE.txt"), encoding="utf-8") as f:
        text = f.read()
    # The CNRI/CWI parts read like HPND and mention the GPL; SPDX's Python-2.0 covers all of them.
    assert detect_in_text(text) == {"Python-2.0", "0BSD"}


def test_spdx_expressions():
    assert parse_expression("MIT OR Apache-2.0") == [frozenset({"MIT"}), frozenset({"Apache-2.0"})]
    assert parse_expression("(mit AND BSD-3-Clause) OR GPL-2.0", ["MIT"]) == [
        frozenset({"MIT", "BSD-3-Clause"}), frozenset({"GPL-2.0"})]
    assert parse_expression("Apache-2.0 WITH LLVM-exception") == [frozenset({"Apache-2.0"})]
    with pytest.raises(DataToolError, match="unbalanced|ends early"):
        parse_expression("(MIT OR")


@pytest.mark.parametrize("directory, declared, header, keep, licenses, rejected", [
    (["MIT"], [], PY_BODY, True, ["MIT"], []),
    (["MIT"], [], "# SPDX-License-Identifier: GPL-2.0-only\n" + PY_BODY, False, ["MIT"], ["GPL-2.0-only"]),
    (["MIT"], [], GPL3_HEADER + PY_BODY, False, ["MIT"], ["GPL-3.0"]),  # mixed license file: dropped
    ([], [], "// SPDX-License-Identifier: MIT OR GPL-3.0-or-later\n" + PY_BODY, True, ["MIT"], []),
    ([], [], "/* SPDX-License-Identifier: MIT AND GPL-3.0-or-later */\n" + PY_BODY, False, ["MIT"], ["GPL-3.0-or-later"]),
    ([], ["Apache-2.0"], PY_BODY, True, ["Apache-2.0"], []),
    ([], [], PY_BODY, False, [], []),
])
def test_license_decision(directory, declared, header, keep, licenses, rejected):
    decision = decide_license(directory, declared, header, LicenseConfig())
    assert decision.keep is keep
    assert decision.rejected == rejected
    if keep:
        assert decision.licenses == licenses
    if not directory and not declared and not keep and not rejected:
        assert decision.reason == "license_none"


def test_license_whitelist_is_configurable():
    config = LicenseConfig(permissive=["Apache-2.0"])
    assert not decide_license(["MIT"], [], PY_BODY, config).keep
    assert decide_license(["Apache-2.0"], [], PY_BODY, config).licenses == ["Apache-2.0"]


@pytest.mark.parametrize("path, text, language", [
    ("a/b.py", "x = 1\n", "python"),
    ("tool", "#!/usr/bin/env python3.11\nprint(1)\n", "python"),
    ("run", "#!/bin/bash\necho hi\n", "bash"),
    ("cli", "#!/usr/bin/env -S node --harmony\nconsole.log(1)\n", "javascript"),
    ("x.h", "#include <stdio.h>\nint f(void);\n", "c"),
    ("x.h", "namespace a {\nclass B {};\n}\n", "cpp"),
    ("Makefile", "all:\n\tgcc x.c\n", None),
    ("notes.txt", "def f():\n  pass\n", None),
    (None, "#include <stdio.h>\nint main(void) { printf(\"hi\"); return 0; }\n", "c"),
    (None, "package main\n\nfunc main() {\n\tx := 1\n}\n", "go"),
    (None, "fn main() {\n    let mut x = 1;\n    println!(\"{}\", x);\n}\n", "rust"),
    (None, "import os\n\ndef f(x):\n    return x\n", "python"),
    (None, "public class A {\n  public static void main(String[] a) { System.out.println(1); }\n}\n", "java"),
])
def test_language_detection(path, text, language):
    assert detect_language(path, text) == language


def test_quality_filters_each_report_their_name():
    config = QualityConfig()
    ok = "def f(x):\n    return x * 2\n" * 3
    assert quality_rejection("a.py", ok, config) is None
    assert quality_rejection("a.py", "x=1\n", config) == "min_file_bytes"
    assert quality_rejection("a.py", ok * 5000, QualityConfig(max_file_bytes=1000)) == "max_file_bytes"
    assert quality_rejection("a.py", "x = '" + "a" * 2000 + "'\n", config) == "max_line_length"
    assert quality_rejection("a.py", ("y = '" + "b" * 150 + "'\n") * 5, config) == "max_mean_line_length"
    assert quality_rejection("a.py", "# ----- ##### ----- #####\n" * 10, config) == "min_alphanum_fraction"
    assert quality_rejection("a.go", "// Code generated by protoc-gen-go. DO NOT EDIT.\n" + ok, config) == "generated"
    assert quality_rejection("node_modules/x/index.js", ok, config) == "vendored"
    assert quality_rejection("web/app.min.js", ok, config) == "minified"
    off = QualityConfig(max_line_length=0, max_mean_line_length=0)
    assert quality_rejection("a.py", "x = '" + "a" * 2000 + "'\n", off) is None


def _write(root, rel, text):
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


@pytest.fixture
def tree(tmp_path):
    root = str(tmp_path / "project")
    good = PY_BODY * 3
    _write(root, "LICENSE", MIT_TEXT)
    _write(root, "src/good.py", good)
    _write(root, "src/also_good.c", "#include <stdio.h>\nint main(void) {\n    printf(\"hello\\n\");\n    return 0;\n}\n")
    _write(root, "src/mixed.py", GPL3_HEADER + good)
    _write(root, "src/dual.py", "# SPDX-License-Identifier: Apache-2.0 OR GPL-2.0-only\n" + good)
    _write(root, "src/gen_pb2.py", "# Generated by the protocol buffer compiler.  DO NOT EDIT!\n" + good)
    _write(root, "third_party/lib/util.py", good)
    _write(root, "web/app.min.js", "var a=1;" * 20 + "\n")
    _write(root, "data/table.py", "T = [" + ", ".join(str(i) for i in range(400)) + "]\n")
    _write(root, "scripts/deploy", "#!/bin/bash\nset -e\necho \"deploying\"\nrsync -a build/ host:/srv/\n")
    _write(root, "README.md", "# Project\n")
    _write(root, "lib/tool.rb", "puts 'hello world from ruby'\n" * 3)
    _write(root, "src/empty.py", "   \n")
    _write(root, "gpl_module/LICENSE", GPL3_LICENSE_FILE)
    _write(root, "gpl_module/core.py", good)
    return root


def test_ingest_tree_counts_every_drop(tree):
    config = IngestConfig(sources=[SourceConfig(path=tree)])
    entries = plan_ingest(config)
    counts = collections.Counter()
    docs = list(ingest_entries(config, entries, counts))
    kept = {d["path"]: d for d in docs}
    assert sorted(kept) == ["scripts/deploy", "src/also_good.c", "src/dual.py", "src/good.py"]
    assert kept["src/good.py"]["licenses"] == ["MIT"] and kept["src/good.py"]["license"] == "MIT"
    assert kept["src/dual.py"]["licenses"] == ["Apache-2.0", "MIT"]
    assert kept["scripts/deploy"]["language"] == "bash" and kept["src/also_good.c"]["language"] == "c"
    assert {d["source"] for d in docs} == {"project"} and all(d["id"].startswith("seed-") for d in docs)
    assert "commit" not in kept["src/good.py"]  # not a git checkout
    assert dict(counts) == {
        "dropped.license_not_permissive": 2, "license_rejected.GPL-3.0": 2,  # src/mixed.py, gpl_module/core.py
        "dropped.quality.generated": 1, "dropped.quality.vendored": 1, "dropped.quality.minified": 1,
        "dropped.quality.max_line_length": 1, "dropped.language_unknown": 3,  # README.md and the two LICENSE files
        "dropped.language_not_selected.ruby": 1, "dropped.read.empty": 1,
    }
    assert len(entries) == len(docs) + sum(v for k, v in counts.items() if k.startswith("dropped."))


def test_ingest_without_any_license_drops_and_counts(tmp_path):
    _write(str(tmp_path), "a.py", PY_BODY * 2)
    config = IngestConfig(sources=[SourceConfig(path=str(tmp_path))])
    counts = collections.Counter()
    assert list(ingest_entries(config, plan_ingest(config), counts)) == []
    assert counts == {"dropped.license_none": 1}
    declared = IngestConfig(sources=[SourceConfig(path=str(tmp_path), license="BSD-3-Clause")])
    docs = list(ingest_entries(declared, plan_ingest(declared), collections.Counter()))
    assert [d["licenses"] for d in docs] == [["BSD-3-Clause"]]


def test_git_checkout_records_commit_and_skips_ignored(tree):
    def git(*args):
        return subprocess.run(["git", "-C", tree, *args], check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    _write(tree, ".gitignore", "build/\n")
    _write(tree, "build/out.py", PY_BODY * 3)
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "init")
    _write(tree, "src/untracked.py", PY_BODY * 4)  # in the working tree, not committed: still read
    config = IngestConfig(sources=[SourceConfig(path=tree)])
    docs = list(ingest_entries(config, plan_ingest(config), collections.Counter()))
    paths = {d["path"] for d in docs}
    assert "src/untracked.py" in paths and "build/out.py" not in paths
    assert {d["commit"] for d in docs} == {git("rev-parse", "HEAD")}


def test_jsonl_source_uses_record_licenses(tmp_path):
    path = tmp_path / "corpus.jsonl"
    rows = [{"text": PY_BODY * 2, "path": "a.py", "license": "MIT"},
            {"text": PY_BODY * 3, "path": "b.py", "licenses": ["GPL-3.0-only"]},
            {"text": "int main(void) { printf(\"x\"); return 0; }\n#include <stdio.h>\n", "license": "Apache-2.0"},
            {"text": PY_BODY * 4, "path": "d.py"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = IngestConfig(sources=[SourceConfig(path=str(path))])
    counts = collections.Counter()
    docs = list(ingest_entries(config, plan_ingest(config), counts))
    assert [(d["path"], d["language"], d["licenses"]) for d in docs] == [("a.py", "python", ["MIT"]),
                                                                         (None, "c", ["Apache-2.0"])]
    assert counts["dropped.license_not_permissive"] == 1 and counts["dropped.license_none"] == 1
    assert {d["source"] for d in docs} == {"corpus"}


def test_ingest_cli(tree, tmp_path, capsys):
    out = tmp_path / "seeds.jsonl"
    ingest_cli.main(["--source", os.path.join(tree, "src"), "--license", "MIT", "--output", str(out)])
    summary = capsys.readouterr().out
    assert "kept 3 of 6 files" in summary and "license_not_permissive=1" in summary and "generated=1" in summary
    assert len(out.read_text().splitlines()) == 3
    with pytest.raises(SystemExit) as excinfo:
        ingest_cli.main(["--source", str(tmp_path / "missing"), "--output", str(tmp_path / "x.jsonl")])
    assert "missing" in str(excinfo.value.code) and "does not exist" in str(excinfo.value.code)
