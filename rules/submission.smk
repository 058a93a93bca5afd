# The upstream records/ folder for the chosen policy and seeds, scored from the eval outputs,
# with the exported train_gpt.py that reproduces them.


rule submission:
    input:
        unpack(submission_inputs),
    output:
        directory(f"results/{RUN}/submission"),
    log:
        log("submission"),
    benchmark:
        bench("submission")
    conda:
        "../envs/pgolf.yaml"
    params:
        submission=submission_settings(),
        modes=config["eval"]["modes"],
        run=RUN,
        export=export_spec(),
        matrices=MATRICES,
        code=stage_code("submission.py"),
    script:
        "../workflow_scripts/submission.py"
