# Tokenizer: train SentencePiece BPE on the training documents, or take a provided model.


rule tokenizer:
    input:
        unpack(tokenizer_inputs),
    output:
        model=data("tokenizer.model"),
        meta=data("tokenizer.json"),
    log:
        log("tokenizer"),
    benchmark:
        bench("tokenizer")
    conda:
        "../envs/pgolf.yaml"
    threads: 8
    params:
        tokenizer=config["tokenizer"],
        val_docs=config["shards"]["val_docs"],
        code=stage_code("tokenizer.py"),
    script:
        "../workflow_scripts/tokenizer.py"
