rule panel_hvg:
    input:
        summary=out("stats/species/{species}.summary.parquet"),
        token_mapping=out(
            "references/vocabulary/token_mappings_per_specie/{species}.csv"
        ),
    output:
        panel=out("panels/{species}/hvg.csv"),
        report=out("qc/panels/{species}/hvg.json"),
    log:
        out("logs/panels/{species}/hvg.log"),
    conda:
        "../../envs/prep.yaml"
    params:
        settings=as_json(config["panels"]["hvg"]),
        version=panels.FORMAT_VERSION,
    shell:
        "python -m cellfoundry panel --species {wildcards.species} --name hvg "
        "--token-mapping {input.token_mapping:q} --summary {input.summary:q} "
        "--settings {params.settings:q} --out {output.panel:q} --report {output.report:q} "
        "> {log:q} 2>&1"


rule panel_user:
    input:
        source=user_panel_source,
        reference=out("references/genes/{species}.parquet"),
        token_mapping=out(
            "references/vocabulary/token_mappings_per_specie/{species}.csv"
        ),
    output:
        panel=out("panels/{species}/{panel}.csv"),
        report=out("qc/panels/{species}/{panel}.json"),
    log:
        out("logs/panels/{species}/{panel}.log"),
    wildcard_constraints:
        panel="|".join(re.escape(name) for name in USER_PANEL_NAMES) or "(?!)",
    conda:
        "../../envs/prep.yaml"
    params:
        version=panels.FORMAT_VERSION,
    shell:
        "python -m cellfoundry panel --species {wildcards.species} --name {wildcards.panel} "
        "--token-mapping {input.token_mapping:q} --source {input.source:q} "
        "--reference {input.reference:q} --out {output.panel:q} --report {output.report:q} "
        "> {log:q} 2>&1"
