# The upstream records/ folder for the chosen policy and seeds, scored from the eval outputs.


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
        code=stage_code("submission.py"),
    script:
        "../workflow_scripts/submission.py"
