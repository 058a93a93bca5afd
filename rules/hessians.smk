# Hessians: X^T X of each quantizable matrix's input, calibrated on training windows.


rule hessians:
    input:
        model=seed_path("model.safetensors"),
        shards=data("shards"),
    output:
        seed_path("hessians.safetensors"),
    log:
        f"results/{RUN}/logs/hessians_seed{{seed}}.log",
    benchmark:
        f"results/{RUN}/benchmarks/hessians_seed{{seed}}.tsv"
    conda:
        "../envs/pgolf.yaml"
    threads: 8
    resources:
        gpu=gpus("hessian"),
    params:
        hessian=config["hessian"],
        seq_len=config["train"]["seq_len"],
        code=stage_code("hessians.py"),
    script:
        "../workflow_scripts/hessians.py"
