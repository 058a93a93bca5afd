# pgolf: the Parameter Golf workflow as file-addressed stages. This file is the index only:
# helpers live in rules/common.smk, each stage in its own rules/<stage>.smk.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


report: "rules/captions/workflow.rst"


wildcard_constraints:
    seed=r"\d+",
    policy=r"[a-z0-9_]+",
    matrix=r"[A-Za-z0-9_.]+",


include: "rules/common.smk"
include: "rules/corpus.smk"
include: "rules/tokenizer.smk"
include: "rules/shards.smk"
include: "rules/scores.smk"
include: "rules/manifest.smk"
include: "rules/train.smk"
include: "rules/hessians.smk"
include: "rules/quantize.smk"
include: "rules/sweep.smk"
include: "rules/eval.smk"
include: "rules/analysis.smk"
include: "rules/report.smk"
include: "rules/submission.smk"


rule all:
    default_target: True
    input:
        final_targets(),
