rule report_corpus:
    input:
        qc=expand(out("qc/{dataset}/qc.json"), dataset=sorted(DATASETS.index)),
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


rule report_embeddings:
    input:
        model=out(f"model_checkpoints/{TRAIN_RUN}/final/model.safetensors"),
        h5ads=all_h5ads(sorted(DATASETS.index)),
    output:
        figure=report(
            out(f"report/cell_embeddings_{TRAIN_RUN}.png"),
            caption="../report/embeddings.rst",
            category="4. Cell embeddings",
            labels={"figure": "UMAP by label"},
        ),
        table=out(f"report/cell_embeddings_{TRAIN_RUN}.tsv"),
        html=report(
            out(f"report/cell_embeddings_{TRAIN_RUN}.html"),
            caption="../report/embeddings.rst",
            category="4. Cell embeddings",
            labels={"figure": "kNN accuracy"},
        ),
    log:
        out("logs/report/embeddings.log"),
    benchmark:
        out("benchmarks/report/embeddings.tsv")
    conda:
        "../../envs/report.yaml"
    params:
        model_dir=folder_of_model,
        species=dataset_species_json(),
        k=15,
        seed=config["seed"],
    shell:
        "python -m cellfoundry report-embeddings --model {params.model_dir:q} --h5ads {input.h5ads:q} "
        "--species {params.species:q} --k {params.k} --seed {params.seed} --out {output.figure:q} "
        "--table {output.table:q} --html {output.html:q} > {log:q} 2>&1"
