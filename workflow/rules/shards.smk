rule shards:
    input:
        out("data/{dataset}/h5ads"),
    output:
        directory(out("shards/{dataset}")),
    log:
        out("logs/shards/{dataset}.log"),
    benchmark:
        out("benchmarks/shards/{dataset}.tsv")
    conda:
        "../../envs/prep.yaml"
    params:
        species=species_of,
        n_bins=config["shards"]["n_bins"],
        version=shards.FORMAT_VERSION,
    shell:
        "python -m cellfoundry shards --dataset {wildcards.dataset} --species {params.species} "
        "--h5ad-dir {input:q} --n-bins {params.n_bins} --out {output:q} > {log:q} 2>&1"


rule shard_manifest:
    input:
        splits=out("manifests/splits.parquet"),
        shards=expand(out("shards/{dataset}"), dataset=sorted(DATASETS.index)),
    output:
        out("manifests/shards.parquet"),
    log:
        out("logs/shard_manifest.log"),
    conda:
        "../../envs/prep.yaml"
    shell:
        "python -m cellfoundry shard-manifest --splits {input.splits:q} --shards {input.shards:q} "
        "--out {output:q} > {log:q} 2>&1"
