"""Submission stage: the upstream records/ folder for a policy and a seed set."""

from pathlib import Path

from pgolf.config import section
from pgolf.stage import logged
from pgolf.submission import SubmissionConfig, export_submission, load_runs, script

with logged(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    sm = snakemake  # noqa: F821
    settings = dict(sm.params.submission)
    seeds = settings.pop("seeds")
    cfg = section(SubmissionConfig, settings, "submission")
    runs = load_runs(seeds, evals=list(sm.input.evals), artifacts=list(sm.input.artifacts),
                     train=list(sm.input.train), policy=cfg.policy, modes=list(sm.params.modes),
                     logs=Path(sm.log[0]).parent, allocations=list(sm.input.allocations))
    code = script(runs, dict(sm.params.export), list(sm.params.matrices))
    export_submission(runs, Path(sm.output[0]), cfg=cfg, modes=list(sm.params.modes),
                      run_name=sm.params.run, code=code)
