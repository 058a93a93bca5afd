# Train: one torchrun job per seed (NCCL on GPUs, gloo on CPU); EMA weights, summary, metrics.
# Resume states live in results/<run>/.resume/, outside the outputs, so a failed or killed job
# keeps them and its rerun continues from the latest one.


rule train:
    input:
        shards=data("shards"),
        shards_meta=data("shards.json"),
        manifest=data("curriculum.parquet"),
        tokenizer=data("tokenizer.model"),
    output:
        model=seed_path("model.safetensors"),
        meta=seed_path("train.json"),
        metrics=seed_path("metrics.parquet"),
    log:
        f"results/{RUN}/logs/train_seed{{seed}}.log",
    benchmark:
        f"results/{RUN}/benchmarks/train_seed{{seed}}.tsv"
    conda:
        "../envs/pgolf.yaml"
    threads: train_threads()
    resources:
        gpu=gpus("train"),
    params:
        spec=train_spec(),
        nproc=config["train"]["nproc"],
        state_dir=lambda wildcards: f"results/{RUN}/.resume/seed{wildcards.seed}",
        code=stage_code("src/pgolf/train/main.py", *MODEL_CODE),
    shell:
        # a local GPU job claims its devices first (a prefix only when it has any)
        gpu_slots(gpus("train"))
        + "torchrun --standalone --nproc_per_node={params.nproc} -m pgolf.train"
        " --spec {params.spec:q} --seed {wildcards.seed} --shards {input.shards}"
        " --manifest {input.manifest} --tokenizer {input.tokenizer}"
        " --state-dir {params.state_dir} --model {output.model} --meta {output.meta}"
        " --metrics {output.metrics} --code {params.code} --threads {threads} > {log} 2>&1"
