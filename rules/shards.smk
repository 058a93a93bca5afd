# Shards: tokenize the documents into upstream-format shards, or import an upstream shard folder.


rule shards:
    input:
        unpack(shards_inputs),
    output:
        shards=directory(data("shards")),
        meta=data("shards.json"),
    log:
        log("shards"),
    benchmark:
        bench("shards")
    conda:
        "../envs/pgolf.yaml"
    threads: 8
    params:
        shards=config["shards"],
        caseops=config["tokenizer"]["caseops"],
        code=stage_code("shards.py"),
    script:
        "../workflow_scripts/shards.py"
