# Sensitivity sweep: one job per quantizable matrix (names from the model config), then a table.


rule sweep:
    input:
        model=seed_path("model.safetensors"),
        hessians=seed_path("hessians.safetensors"),
        shards=data("shards"),
        tokenizer=data("tokenizer.model"),
    output:
        seed_path("sweep/{matrix}.parquet"),
    log:
        f"results/{RUN}/logs/sweep_seed{{seed}}_{{matrix}}.log",
    benchmark:
        f"results/{RUN}/benchmarks/sweep_seed{{seed}}_{{matrix}}.tsv"
    conda:
        "../envs/pgolf.yaml"
    threads: 1
    params:
        sweep=config["sweep"],
        gptq=config["gptq"],
        seq_len=config["train"]["seq_len"],
        code=stage_code("sweep.py"),
    script:
        "../workflow_scripts/sweep.py"


rule sensitivity:
    input:
        expand(seed_path("sweep/{matrix}.parquet"), matrix=MATRICES, allow_missing=True),
    output:
        table=seed_path("sensitivity.parquet"),
        plot=report(
            seed_path("sensitivity.png"),
            caption="captions/sensitivity.rst",
            category="Quantization",
        ),
    log:
        f"results/{RUN}/logs/sensitivity_seed{{seed}}.log",
    benchmark:
        f"results/{RUN}/benchmarks/sensitivity_seed{{seed}}.tsv"
    conda:
        "../envs/pgolf.yaml"
    params:
        code=stage_code("sensitivity.py"),
    script:
        "../workflow_scripts/sensitivity.py"
