rule vocabulary:
    input:
        stats=out("stats/species/{species}.parquet"),
        reference=out("references/genes/{species}.parquet"),
        source=vocabulary_import,
    output:
        out("references/vocabulary/token_mappings_per_specie/{species}.csv"),
    log:
        out("logs/vocabulary/{species}.log"),
    conda:
        "../../envs/prep.yaml"
    params:
        min_cells=config["vocabulary"]["min_cells"],
        version=vocabulary.FORMAT_VERSION,
    shell:
        "python -m cellfoundry vocabulary --species {wildcards.species} --stats {input.stats:q} "
        "--reference {input.reference:q} --min-cells {params.min_cells} --import={input.source:q} "
        "--out {output:q} > {log:q} 2>&1"
