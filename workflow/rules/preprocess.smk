rule preprocess:
    input:
        data=dataset_input,
        reference=reference_of,
    output:
        h5ads=directory(out("data/{dataset}/h5ads")),
        gene_stats=out("stats/datasets/{dataset}.parquet"),
        qc=out("qc/{dataset}/qc.json"),
        qc_plot=report(
            out("qc/{dataset}/qc.png"),
            caption="../report/qc.rst",
            category="1. Quality control",
            labels={"dataset": "{dataset}"},
        ),
        provenance=out("provenance/{dataset}.json"),
    log:
        out("logs/preprocess/{dataset}.log"),
    benchmark:
        out("benchmarks/preprocess/{dataset}.tsv")
    conda:
        "../../envs/prep.yaml"
    params:
        path=dataset_path,
        species=species_of,
        settings=preprocess_settings,
        lamin_instance=lamin_source_instance,
        lamin_settings=lamin_source_settings,
        version=preprocess.FORMAT_VERSION,
    shell:
        "python -m cellfoundry preprocess --dataset {wildcards.dataset} --species {params.species} "
        "--input {params.path:q} --reference={input.reference:q} --settings {params.settings:q} "
        "--h5ad-dir {output.h5ads:q} --gene-stats {output.gene_stats:q} --qc-json {output.qc:q} "
        "--qc-plot {output.qc_plot:q} --provenance {output.provenance:q} --lamin-instance={params.lamin_instance:q} "
        "--lamin-settings-dir={params.lamin_settings:q} > {log:q} 2>&1"


rule gene_stats:
    input:
        stats=species_gene_stats,
        medians=medians_import,
    output:
        stats=out("stats/species/{species}.parquet"),
        summary=out("stats/species/{species}.summary.parquet"),
    log:
        out("logs/gene_stats/{species}.log"),
    conda:
        "../../envs/prep.yaml"
    shell:
        "python -m cellfoundry gene-stats --species {wildcards.species} --inputs {input.stats:q} "
        "--out {output.stats:q} --summary {output.summary:q} --medians={input.medians:q} "
        "> {log:q} 2>&1"
