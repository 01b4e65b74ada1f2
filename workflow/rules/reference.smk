rule reference:
    input:
        table=reference_table,
    output:
        out("references/genes/{species}.parquet"),
    log:
        out("logs/reference/{species}.log"),
    conda:
        "../../envs/prep.yaml"
    shell:
        "python -m cellfoundry reference --species {wildcards.species} --table={input.table:q} "
        "--out {output:q} > {log:q} 2>&1"
