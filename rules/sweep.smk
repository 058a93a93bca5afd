# Sensitivity sweeps: the float baseline on the sweep subset, one job per quantizable matrix (names
# from the model config), the block-group sweep, then one table with summaries and plots.


rule sweep_baseline:
    input:
        model=seed_path("model.safetensors"),
        shards=data("shards"),
        tokenizer=data("tokenizer.model"),
    output:
        seed_path("sweep_baseline.parquet"),
    log:
        log("sweep_baseline_seed{seed}"),
    benchmark:
        bench("sweep_baseline_seed{seed}")
    conda:
        "../envs/pgolf.yaml"
    resources:
        gpu=gpus("sweep"),
    params:
        sweep=sweep_params("windows", "batch_seqs", "device"),
        seq_len=config["train"]["seq_len"],
        code=stage_code("sweep_baseline.py"),
    script:
        "../workflow_scripts/sweep_baseline.py"


rule sweep:
    input:
        unpack(sweep_inputs),
    output:
        seed_path("sweep/{matrix}.parquet"),
    log:
        log("sweep_seed{seed}_{matrix}"),
    benchmark:
        bench("sweep_seed{seed}_{matrix}")
    conda:
        "../envs/pgolf.yaml"
    threads: 1
    resources:
        gpu=gpus("sweep"),
    params:
        sweep=sweep_params("bits", "windows", "batch_seqs", "device"),
        gptq=config["gptq"],
        lqer=config["lqer"],
        seq_len=config["train"]["seq_len"],
        code=stage_code("sweep.py"),
    script:
        "../workflow_scripts/sweep.py"


rule block_groups:
    input:
        unpack(sweep_inputs),
    output:
        seed_path("block_groups.parquet"),
    log:
        log("block_groups_seed{seed}"),
    benchmark:
        bench("block_groups_seed{seed}")
    conda:
        "../envs/pgolf.yaml"
    threads: 1
    resources:
        gpu=gpus("sweep"),
    params:
        sweep=sweep_params("group_bits", "bootstrap", "windows", "batch_seqs", "device"),
        gptq=config["gptq"],
        seq_len=config["train"]["seq_len"],
        code=stage_code("block_groups.py"),
    script:
        "../workflow_scripts/block_groups.py"


rule sensitivity:
    input:
        sweeps=expand(
            seed_path("sweep/{matrix}.parquet"), matrix=MATRICES, allow_missing=True
        ),
        groups=seed_path("block_groups.parquet"),
        model=seed_path("model.safetensors"),
    output:
        table=seed_path("sensitivity.parquet"),
        plot=report(
            seed_path("sensitivity.png"),
            caption="captions/sensitivity.rst",
            category="Quantization",
            subcategory="seed {seed}",
        ),
        groups_plot=report(
            seed_path("sensitivity_groups.png"),
            caption="captions/sensitivity_groups.rst",
            category="Quantization",
            subcategory="seed {seed}",
        ),
    log:
        log("sensitivity_seed{seed}"),
    benchmark:
        bench("sensitivity_seed{seed}")
    conda:
        "../envs/pgolf.yaml"
    params:
        code=stage_code("sensitivity.py"),
    script:
        "../workflow_scripts/sensitivity.py"
