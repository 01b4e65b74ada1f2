rule splits:
    input:
        h5ads=expand(out("data/{dataset}/h5ads"), dataset=sorted(DATASETS.index)),
        split_files=split_files(),
    output:
        manifest=out("manifests/splits.parquet"),
        default_splits=default_split_outputs(),
    log:
        out("logs/splits.log"),
    conda:
        "../../envs/prep.yaml"
    params:
        settings=as_json(config["splits"]),
        datasets=dataset_species_json(),
        project_path=project_of_manifest,
        seed=config["seed"],
        version=splits.FORMAT_VERSION,
    shell:
        "python -m cellfoundry splits --settings {params.settings:q} --datasets {params.datasets:q} "
        "--project-path {params.project_path:q} --seed {params.seed} --out {output.manifest:q} "
        "--split-dir {params.project_path:q}/splits > {log:q} 2>&1"
