# Allocation and packing: bits per tensor for each policy, then the GPTQ-quantized artifact.


rule allocate:
    input:
        unpack(allocate_inputs),
    output:
        seed_path("alloc/{policy}.json"),
    log:
        f"results/{RUN}/logs/allocate_seed{{seed}}_{{policy}}.log",
    benchmark:
        f"results/{RUN}/benchmarks/allocate_seed{{seed}}_{{policy}}.tsv"
    conda:
        "../envs/pgolf.yaml"
    params:
        allocate=allocate_params,
        code=stage_code("allocate.py"),
    script:
        "../workflow_scripts/allocate.py"


rule artifact:
    input:
        model=seed_path("model.safetensors"),
        hessians=seed_path("hessians.safetensors"),
        allocation=seed_path("alloc/{policy}.json"),
    output:
        artifact=seed_path("artifact/{policy}.pgz"),
        meta=seed_path("artifact/{policy}.json"),
    log:
        f"results/{RUN}/logs/artifact_seed{{seed}}_{{policy}}.log",
    benchmark:
        f"results/{RUN}/benchmarks/artifact_seed{{seed}}_{{policy}}.tsv"
    conda:
        "../envs/pgolf.yaml"
    threads: 2
    params:
        gptq=config["gptq"],
        pack=config["pack"],
        lqer=config["lqer"],
        code_bytes=CODE,
        code=artifact_code(),
    script:
        "../workflow_scripts/artifact.py"
