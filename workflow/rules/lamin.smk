# Registration of outputs in the project's LaminDB instance (config `lamin.register`). Separate
# rules, so switching registration on or off never reruns the science.


rule lamin_register_dataset:
    input:
        h5ads=lamin_dataset_h5ads,
        source=lamin_dataset_sources,
    output:
        out("lamin/data/{dataset}.json"),
    log:
        out("logs/lamin/data/{dataset}.log"),
    conda:
        "../../envs/report.yaml"
    params:
        project=project_of_receipt,
        name=config["lamin"]["name"],
        version=formats.PREPROCESS,
        params=lamin_dataset_params,
    shell:
        "python -m cellfoundry lamin-register --project {params.project:q} --name {params.name:q} "
        "--transform-key cellfoundry/preprocess --transform-version {params.version} "
        "--params {params.params:q} --outputs {input.h5ads:q} --inputs {input.source:q} "
        "--description 'preprocessed {wildcards.dataset}' --receipt {output:q} > {log:q} 2>&1"


rule lamin_register_references:
    input:
        receipts=lamin_species_dataset_receipts,
        h5ads=lamin_species_h5ads,
        token_mapping=out(
            "references/vocabulary/token_mappings_per_specie/{species}.csv"
        ),
        panels=lamin_species_panels,
        embeddings=lamin_species_embeddings,
    output:
        out("lamin/references/{species}.json"),
    log:
        out("logs/lamin/references/{species}.log"),
    conda:
        "../../envs/report.yaml"
    params:
        project=project_of_receipt,
        name=config["lamin"]["name"],
        version=vocabulary.FORMAT_VERSION,
        params=lamin_reference_params,
    shell:
        "python -m cellfoundry lamin-register --project {params.project:q} --name {params.name:q} "
        "--transform-key cellfoundry/references --transform-version {params.version} "
        "--params {params.params:q} --outputs {input.token_mapping:q} {input.panels:q} "
        "{input.embeddings:q} --inputs {input.h5ads:q} "
        "--description 'references of {wildcards.species}' --receipt {output:q} > {log:q} 2>&1"


rule lamin_register_model:
    input:
        receipts=expand(out("lamin/references/{species}.json"), species=SPECIES),
        model=out(f"model_checkpoints/{TRAIN_RUN}/final/model.safetensors"),
        h5ads=all_h5ads(DATASET_NAMES),
        token_mappings=expand(
            out("references/vocabulary/token_mappings_per_specie/{species}.csv"),
            species=SPECIES,
        ),
        gene_embeddings=training_gene_embeddings(),
    output:
        out(f"lamin/model/{TRAIN_RUN}.json"),
    log:
        out(f"logs/lamin/model/{TRAIN_RUN}.log"),
    conda:
        "../../envs/report.yaml"
    params:
        project=project_of_receipt,
        name=config["lamin"]["name"],
        folder=folder_of_model,
        run=TRAIN_RUN,
        settings=as_json(config["train"]),
    shell:
        "python -m cellfoundry lamin-register --project {params.project:q} --name {params.name:q} "
        "--transform-key cellfoundry/train --transform-version 1 --params {params.settings:q} "
        "--outputs {params.folder:q} --inputs {input.h5ads:q} {input.token_mappings:q} "
        "{input.gene_embeddings:q} --description 'model {params.run}' --receipt {output:q} "
        "> {log:q} 2>&1"
