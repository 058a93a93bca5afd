# Corpus: documents from the configured source -> docs.jsonl + docs.json.


rule corpus:
    input:
        unpack(corpus_inputs),
    output:
        docs=data("docs.jsonl"),
        meta=data("docs.json"),
    log:
        log("corpus"),
    benchmark:
        bench("corpus")
    conda:
        "../envs/pgolf.yaml"
    params:
        corpus=config["corpus"],
        code=stage_code("corpus.py"),
    script:
        "../workflow_scripts/corpus.py"


# Hub shards: upstream's pre-tokenized shards and their tokenizer (corpus.source hub_shards),
# fetched into the hub cache (outside results/, so a failed job keeps what it downloaded).
rule hub_shards:
    output:
        shards=directory(data("hub_shards")),
        tokenizer=data("hub_tokenizer.model"),
        meta=data("hub_shards.json"),
    log:
        log("hub_shards"),
    benchmark:
        bench("hub_shards")
    conda:
        "../envs/pgolf.yaml"
    threads: 8
    params:
        hf=config["corpus"]["hf"],
        vocab_size=config["tokenizer"]["vocab_size"],
        code=stage_code("hub_shards.py"),
    script:
        "../workflow_scripts/hub_shards.py"
