# Analyses of the trained models, per seed under seed{S}/analysis/ (cross-seed Procrustes under
# analysis/): each writes a parquet table whose metadata states its definition and its null or
# noise floor, and a figure for the report.


rule analysis_outliers:
    input:
        model=seed_path("model.safetensors"),
    output:
        table=seed_path("analysis/outliers.parquet"),
        plot=analysis_report("outliers"),
    log:
        log("analysis_outliers_seed{seed}"),
    benchmark:
        bench("analysis_outliers_seed{seed}")
    conda:
        "../envs/pgolf.yaml"
    params:
        outliers=config["analysis"]["outliers"],
        code=stage_code("analysis_outliers.py"),
    script:
        "../workflow_scripts/analysis_outliers.py"


rule analysis_procrustes:
    input:
        model=seed_path("model.safetensors"),
    output:
        table=seed_path("analysis/procrustes_layers.parquet"),
        plot=analysis_report("procrustes_layers"),
    log:
        log("analysis_procrustes_seed{seed}"),
    benchmark:
        bench("analysis_procrustes_seed{seed}")
    conda:
        "../envs/pgolf.yaml"
    params:
        procrustes=config["analysis"]["procrustes"],
        code=stage_code("analysis_procrustes.py"),
    script:
        "../workflow_scripts/analysis_procrustes.py"


rule analysis_procrustes_seeds:
    input:
        models=expand(seed_path("model.safetensors"), seed=SEEDS),
    output:
        table=f"results/{RUN}/analysis/procrustes_seeds.parquet",
        plot=report(
            f"results/{RUN}/analysis/procrustes_seeds.png",
            caption="captions/procrustes_seeds.rst",
            category="Analysis",
            subcategory="across seeds",
        ),
    log:
        log("analysis_procrustes_seeds"),
    benchmark:
        bench("analysis_procrustes_seeds")
    conda:
        "../envs/pgolf.yaml"
    params:
        seeds=SEEDS,
        procrustes=config["analysis"]["procrustes"],
        code=stage_code("analysis_procrustes_seeds.py"),
    script:
        "../workflow_scripts/analysis_procrustes_seeds.py"


rule analysis_skips:
    input:
        model=seed_path("model.safetensors"),
        shards=data("shards"),
        tokenizer=data("tokenizer.model"),
    output:
        table=seed_path("analysis/skips.parquet"),
        plot=analysis_report("skips"),
    log:
        log("analysis_skips_seed{seed}"),
    benchmark:
        bench("analysis_skips_seed{seed}")
    conda:
        "../envs/pgolf.yaml"
    params:
        windows=analysis_windows(),
        seq_len=config["train"]["seq_len"],
        code=stage_code("analysis_skips.py"),
    script:
        "../workflow_scripts/analysis_skips.py"


rule analysis_loops:
    input:
        model=seed_path("model.safetensors"),
        artifacts=expand(
            seed_path("artifact/{policy}.pgz"), policy=POLICIES, allow_missing=True
        ),
        shards=data("shards"),
        tokenizer=data("tokenizer.model"),
    output:
        table=seed_path("analysis/loops.parquet"),
        plot=analysis_report("loops"),
    log:
        log("analysis_loops_seed{seed}"),
    benchmark:
        bench("analysis_loops_seed{seed}")
    conda:
        "../envs/pgolf.yaml"
    params:
        policies=POLICIES,
        windows=analysis_windows(),
        loops=config["analysis"]["loops"],
        seq_len=config["train"]["seq_len"],
        code=stage_code("analysis_loops.py"),
    script:
        "../workflow_scripts/analysis_loops.py"


rule analysis_generation:
    input:
        model=seed_path("model.safetensors"),
        artifacts=expand(
            seed_path("artifact/{policy}.pgz"), policy=POLICIES, allow_missing=True
        ),
        shards=data("shards"),
    output:
        table=seed_path("analysis/generation.parquet"),
        plot=analysis_report("generation"),
    log:
        log("analysis_generation_seed{seed}"),
    benchmark:
        bench("analysis_generation_seed{seed}")
    conda:
        "../envs/pgolf.yaml"
    params:
        policies=POLICIES,
        generation=config["analysis"]["generation"],
        seq_len=config["train"]["seq_len"],
        code=stage_code("analysis_generation.py"),
    script:
        "../workflow_scripts/analysis_generation.py"


rule analysis_damage:
    input:
        allocations=expand(
            seed_path("alloc/{policy}.json"), policy=POLICIES, allow_missing=True
        ),
        prequant=expand(
            seed_path("eval/{policy}/prequant.json"),
            policy=POLICIES,
            allow_missing=True,
        ),
        roundtrip=expand(
            seed_path("eval/{policy}/roundtrip.json"),
            policy=POLICIES,
            allow_missing=True,
        ),
        sensitivity=seed_path("sensitivity.parquet"),
    output:
        table=seed_path("analysis/damage.parquet"),
        plot=analysis_report("damage"),
    log:
        log("analysis_damage_seed{seed}"),
    benchmark:
        bench("analysis_damage_seed{seed}")
    conda:
        "../envs/pgolf.yaml"
    params:
        policies=POLICIES,
        code=stage_code("analysis_damage.py"),
    script:
        "../workflow_scripts/analysis_damage.py"
