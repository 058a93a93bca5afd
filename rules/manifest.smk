# Curriculum manifest: equal-count score buckets over the training windows.


rule curriculum:
    input:
        data("window_scores.parquet"),
    output:
        manifest=data("curriculum.parquet"),
        meta=data("curriculum.json"),
        plot=report(
            data("curriculum.png"),
            caption="captions/curriculum.rst",
            category="Data",
        ),
    log:
        log("curriculum"),
    benchmark:
        bench("curriculum")
    conda:
        "../envs/pgolf.yaml"
    params:
        manifest=config["manifest"],
        code=stage_code("curriculum.py"),
    script:
        "../workflow_scripts/curriculum.py"
