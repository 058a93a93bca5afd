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
