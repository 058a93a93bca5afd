# Evaluation: prequant scores the float checkpoint once per seed (one file per policy); roundtrip,
# sliding, ttt and phased_ttt rebuild the model from the packed artifact alone. Then the seed
# statistics.


rule eval_prequant:
    input:
        model=seed_path("model.safetensors"),
        shards=data("shards"),
        tokenizer=data("tokenizer.model"),
    output:
        expand(
            seed_path("eval/{policy}/prequant.json"),
            policy=POLICIES,
            allow_missing=True,
        ),
    log:
        log("eval_seed{seed}_prequant"),
    benchmark:
        bench("eval_seed{seed}_prequant")
    conda:
        "../envs/pgolf.yaml"
    threads: config["eval"]["nproc"]
    resources:
        gpu=gpus("eval"),
    params:
        spec=eval_spec("prequant"),
        launcher=eval_launcher(),
        outs=lambda wildcards, output: " ".join(f"--out {o}" for o in output),
        code=stage_code("src/pgolf/eval/run.py", *MODEL_CODE),
    shell:
        "{params.launcher} -m pgolf.eval --mode prequant --model {input.model}"
        " --shards {input.shards} --tokenizer {input.tokenizer} --spec {params.spec:q}"
        " {params.outs} --code {params.code} --threads {threads} > {log} 2>&1"


rule eval:
    input:
        unpack(eval_inputs),
    output:
        seed_path("eval/{policy}/{mode}.json"),
    log:
        log("eval_seed{seed}_{policy}_{mode}"),
    benchmark:
        bench("eval_seed{seed}_{policy}_{mode}")
    wildcard_constraints:
        mode="roundtrip|sliding|ttt|phased_ttt",
    conda:
        "../envs/pgolf.yaml"
    threads: config["eval"]["nproc"]
    resources:
        gpu=gpus("eval"),
    params:
        spec=lambda wildcards: eval_spec(wildcards.mode),
        launcher=eval_launcher(),
        inputs=eval_args,
        code=stage_code("src/pgolf/eval/run.py", *MODEL_CODE),
    shell:
        "{params.launcher} -m pgolf.eval --mode {wildcards.mode} {params.inputs}"
        " --shards {input.shards} --tokenizer {input.tokenizer} --spec {params.spec:q}"
        " --out {output} --code {params.code} --threads {threads} > {log} 2>&1"


rule seeds:
    input:
        evals=eval_results(),
        artifacts=expand(
            seed_path("artifact/{policy}.json"), seed=SEEDS, policy=POLICIES
        ),
    output:
        stats=f"results/{RUN}/seeds.json",
        table=f"results/{RUN}/seeds.md",
        page=report(
            f"results/{RUN}/seeds.html",
            caption="captions/seeds.rst",
            category="Evaluation",
        ),
    log:
        log("seeds"),
    benchmark:
        bench("seeds")
    conda:
        "../envs/pgolf.yaml"
    params:
        seeds=SEEDS,
        policies=POLICIES,
        modes=config["eval"]["modes"],
        code=stage_code("seeds.py"),
    script:
        "../workflow_scripts/seeds.py"
