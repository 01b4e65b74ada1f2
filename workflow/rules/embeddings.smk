rule gene_embeddings:
    input:
        manifests=species_shard_manifests,
        token_mapping=out(
            "references/vocabulary/token_mappings_per_specie/{species}.csv"
        ),
    output:
        embeddings=out("references/embeddings/{embedding}/{species}.csv"),
        report=out("qc/embeddings/{embedding}/{species}.json"),
    log:
        out("logs/gene_embeddings/{embedding}/{species}.log"),
    benchmark:
        out("benchmarks/gene_embeddings/{embedding}/{species}.tsv")
    conda:
        "../../envs/train.yaml"
    params:
        settings=embedding_settings,
        seed=config["seed"],
        version=embeddings.FORMAT_VERSION,
    shell:
        "python -m cellfoundry embeddings --name {wildcards.embedding} --species {wildcards.species} "
        "--token-mapping {input.token_mapping:q} --shard-manifests {input.manifests:q} "
        "--settings {params.settings:q} --seed {params.seed} --out {output.embeddings:q} "
        "--report {output.report:q} 2>&1 | tee {log:q}"
