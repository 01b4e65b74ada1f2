rule shard_manifest:
    input:
        splits=out("manifests/splits.parquet"),
        holdout=out("manifests/holdout.parquet"),
        manifests=shard_manifests(),
    output:
        out("manifests/shards.parquet"),
    log:
        out("logs/shard_manifest.log"),
    conda:
        "../../envs/prep.yaml"
    shell:
        "python -m cellfoundry shard-manifest --splits {input.splits:q} --holdout {input.holdout:q} "
        "--manifests {input.manifests:q} --out {output:q} > {log:q} 2>&1"
