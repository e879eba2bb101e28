"""The builtin stages, registered under the names recipes use.

| stage | kind | reads | writes |
| --- | --- | --- | --- |
| ingest | map (planned) | recipe sources | seed documents |
| generate | map (resumable) | seed documents | samples (accepted, and executed failures) |
| validate | map | samples | samples with ``execution``; verdict counts |
| repair | map (resumable) | validated samples | the same + passing repairs of failing ones |
| dedup | global | documents | documents + dedup_report.json |
| decontaminate | global | documents | documents + decontamination_report.json |
| report | global | documents + earlier stages' markers | report.json, report.html |
| export | global | documents | pretrain/sft/dpo jsonl, .bin/.idx, manifest.json |

``generate`` and ``repair`` are in generate_stage.py, ``validate`` in validate_stage.py.
"""
from __future__ import annotations

import os

from data_tools.dedup import DedupConfig, deduplicate
from data_tools.decontaminate import DecontaminateConfig, decontaminate
from data_tools.export import ExportConfig, export
from data_tools.ingest.core import IngestConfig, ingest_entries, plan_ingest
from data_tools.pipeline.context import GlobalContext
from data_tools.pipeline.generate_stage import GenerateStageConfig, RepairStageConfig, generate_shard, repair_shard
from data_tools.pipeline.registry import StageSpec, register_stage
from data_tools.pipeline.validate_stage import ValidateStageConfig, validate_shard
from data_tools.report import ReportConfig, build_report, write_report


def _outputs(ctx: GlobalContext) -> list[str]:
    return [ctx.output_shard(shard) for shard in range(ctx.num_shards)]


def dedup_stage(config: DedupConfig, ctx: GlobalContext) -> None:
    report = deduplicate(ctx.input_shards, _outputs(ctx), os.path.join(ctx.stage_dir, "dedup_report.json"),
                         config, ctx.map, ctx.work_dir)
    ctx.counts.update(report["counts"])


def decontaminate_stage(config: DecontaminateConfig, ctx: GlobalContext) -> None:
    report = decontaminate(ctx.input_shards, _outputs(ctx), os.path.join(ctx.stage_dir, "decontamination_report.json"),
                           config, ctx.map)
    ctx.counts.update(report["counts"])


def report_stage(config: ReportConfig, ctx: GlobalContext) -> None:
    report = build_report(ctx.input_shards, config, ctx.earlier_stages, ctx.map)
    write_report(report, os.path.join(ctx.stage_dir, "report.json"), os.path.join(ctx.stage_dir, "report.html"))
    ctx.counts["documents"] = report["documents"]


def export_stage(config: ExportConfig, ctx: GlobalContext) -> None:
    manifest = export(ctx.input_shards, ctx.stage_dir, config, ctx.work_dir, recipe=ctx.recipe_raw, progress=ctx.progress)
    ctx.counts.update(manifest["counts"])


register_stage(StageSpec(name="ingest", kind="map", config_cls=IngestConfig, run=ingest_entries, plan=plan_ingest,
                         help="seed files/dirs/git checkouts/jsonl -> license- and quality-filtered seed documents"))
register_stage(StageSpec(name="generate", kind="map", config_cls=GenerateStageConfig, run=generate_shard,
                         shard_context=True, help="teacher LLM samples from the seed documents (resumes after a crash)"))
register_stage(StageSpec(name="validate", kind="map", config_cls=ValidateStageConfig, run=validate_shard,
                         shard_context=True, help="run each sample's tests in the sandbox; sets execution, counts verdicts"))
register_stage(StageSpec(name="repair", kind="map", config_cls=RepairStageConfig, run=repair_shard,
                         shard_context=True, help="failing samples + sandbox feedback -> teacher fixes, added if they pass"))
register_stage(StageSpec(name="dedup", kind="global", config_cls=DedupConfig, run=dedup_stage,
                         help="exact + MinHash near-duplicate removal, with dedup_report.json"))
register_stage(StageSpec(name="decontaminate", kind="global", config_cls=DecontaminateConfig, run=decontaminate_stage,
                         help="remove HumanEval / benchmark overlap (n-grams, substrings), with a report"))
register_stage(StageSpec(name="report", kind="global", config_cls=ReportConfig, run=report_stage,
                         produces_documents=False, help="coverage report: report.json + self-contained report.html"))
register_stage(StageSpec(name="export", kind="global", config_cls=ExportConfig, run=export_stage,
                         produces_documents=False, help="pretrain/SFT/DPO jsonl, tokenized .bin/.idx, manifest.json"))
