rule report_corpus:
    input:
        qc=per_dataset("qc/{dataset}/qc.json"),
        token_mappings=expand(
            out("references/vocabulary/token_mappings_per_specie/{species}.csv"),
            species=SPECIES,
        ),
        panel_reports=panel_reports(),
        embedding_reports=expand(
            out("qc/embeddings/{embedding}/{species}.json"),
            embedding=EMBEDDINGS,
            species=SPECIES,
        ),
    output:
        datasets=out("report/datasets.tsv"),
        species=out("report/species.tsv"),
        html=report(
            out("report/corpus.html"),
            caption="../report/corpus.rst",
            category="2. Corpus",
            labels={"table": "datasets and species"},
        ),
    log:
        out("logs/report/corpus.log"),
    conda:
        "../../envs/report.yaml"
    shell:
        "python -m cellfoundry report-corpus --qc {input.qc:q} --token-mappings {input.token_mappings:q} "
        "--panel-reports {input.panel_reports:q} --embedding-reports {input.embedding_reports:q} "
        "--datasets-out {output.datasets:q} --species-out {output.species:q} --html {output.html:q} "
        "> {log:q} 2>&1"


rule report_training:
    input:
        out(f"model_checkpoints/{TRAIN_RUN}/final/model.safetensors"),
    output:
        figure=report(
            out(f"report/training_{TRAIN_RUN}.png"),
            caption="../report/training.rst",
            category="3. Training",
            labels={"figure": "loss and accuracy"},
        ),
        summary=out(f"report/training_{TRAIN_RUN}.json"),
    log:
        out("logs/report/training.log"),
    conda:
        "../../envs/report.yaml"
    params:
        metrics=out(f"model_checkpoints/{TRAIN_RUN}/logs/metrics.csv"),
        title=f"run {TRAIN_RUN}: {config['train']['objective']}",
    shell:
        "python -m cellfoundry report-training --metrics {params.metrics:q} --title {params.title:q} "
        "--out {output.figure:q} --summary {output.summary:q} > {log:q} 2>&1"


rule report_evaluation:
    input:
        out(f"model_checkpoints/{TRAIN_RUN}/final/model.safetensors"),
    output:
        report(
            directory(out(f"report/evaluation_{TRAIN_RUN}")),
            patterns=["{name}.png"],
            caption="../report/evaluation.rst",
            category="4. Cell embeddings",
            labels={"dataset": "{name}", "figure": "metrics during training"},
        ),
    log:
        out("logs/report/evaluation.log"),
    conda:
        "../../envs/report.yaml"
    params:
        metrics=out(f"model_checkpoints/{TRAIN_RUN}/logs/metrics.csv"),
    shell:
        "python -m cellfoundry report-evaluation --metrics {params.metrics:q} --out-dir {output:q} "
        "> {log:q} 2>&1"


rule report_embeddings:
    input:
        model=out(f"model_checkpoints/{TRAIN_RUN}/final/model.safetensors"),
        manifest=out("manifests/shards.parquet"),
        eval_files=evaluation_files(),
    output:
        figures=report(
            directory(out(f"report/cell_embeddings_{TRAIN_RUN}")),
            patterns=["{name}.png"],
            caption="../report/embeddings.rst",
            category="4. Cell embeddings",
            labels={"dataset": "{name}", "figure": "UMAP by label"},
        ),
        table=out(f"report/cell_embeddings_{TRAIN_RUN}.tsv"),
        html=report(
            out(f"report/cell_embeddings_{TRAIN_RUN}.html"),
            caption="../report/embeddings.rst",
            category="4. Cell embeddings",
            labels={"dataset": "all", "figure": "metrics: model vs PCA"},
        ),
    log:
        out("logs/report/embeddings.log"),
    benchmark:
        out("benchmarks/report/embeddings.tsv")
    conda:
        "../../envs/report.yaml"
    params:
        model_dir=folder_of_model,
        settings=as_json(config["eval"]),
        seed=config["seed"],
    shell:
        "python -m cellfoundry report-embeddings --model {params.model_dir:q} "
        "--manifest {input.manifest:q} --settings {params.settings:q} --seed {params.seed} "
        "--out-dir {output.figures:q} --table {output.table:q} --html {output.html:q} "
        "> {log:q} 2>&1"
