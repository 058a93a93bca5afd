# Report figures from files the stages already write: training loss curves across seeds, and per
# seed the bit allocations and the artifacts' byte breakdown.


rule loss_curves:
    input:
        metrics=expand(seed_path("metrics.parquet"), seed=SEEDS),
    output:
        report(
            f"results/{RUN}/loss_curves.png",
            caption="captions/loss_curves.rst",
            category="Training",
        ),
    log:
        log("loss_curves"),
    benchmark:
        bench("loss_curves")
    conda:
        "../envs/pgolf.yaml"
    params:
        seeds=SEEDS,
        code=stage_code("loss_curves.py"),
    script:
        "../workflow_scripts/loss_curves.py"


rule allocation_plots:
    input:
        allocations=expand(
            seed_path("alloc/{policy}.json"), policy=POLICIES, allow_missing=True
        ),
        artifacts=expand(
            seed_path("artifact/{policy}.json"), policy=POLICIES, allow_missing=True
        ),
    output:
        allocation=report(
            seed_path("allocation.png"),
            caption="captions/allocation.rst",
            category="Quantization",
            subcategory="seed {seed}",
        ),
        bytes=report(
            seed_path("bytes.png"),
            caption="captions/bytes.rst",
            category="Quantization",
            subcategory="seed {seed}",
        ),
    log:
        log("allocation_plots_seed{seed}"),
    benchmark:
        bench("allocation_plots_seed{seed}")
    conda:
        "../envs/pgolf.yaml"
    params:
        policies=POLICIES,
        code=stage_code("allocation_plots.py"),
    script:
        "../workflow_scripts/allocation_plots.py"
