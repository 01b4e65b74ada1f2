rule splits:
    input:
        qc=per_dataset("qc/{dataset}/qc.json"),
        manifests=shard_manifests(),
        split_files=split_files(),
    output:
        manifest=out("manifests/splits.parquet"),
        holdout=out("manifests/holdout.parquet"),
        default_splits=default_split_outputs(),
    log:
        out("logs/splits.log"),
    conda:
        "../../envs/prep.yaml"
    params:
        settings=as_json(config["splits"]),
        project_path=project_of_manifest,
        seed=config["seed"],
        version=splits.FORMAT_VERSION,
    shell:
        "python -m cellfoundry splits --settings {params.settings:q} --qc {input.qc:q} "
        "--manifests {input.manifests:q} --project-path {params.project_path:q} "
        "--seed {params.seed} --out {output.manifest:q} --holdout {output.holdout:q} "
        "--split-dir {params.project_path:q}/splits > {log:q} 2>&1"
