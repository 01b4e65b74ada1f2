rule preprocess:
    input:
        data=file_input,
        reference=reference_of,
    output:
        h5ad=out("data/{dataset}/h5ads/{file}.h5ad"),
        shard=directory(out("shards/{dataset}/{file}")),
        gene_stats=out("stats/files/{dataset}/{file}.parquet"),
        qc=out("qc/{dataset}/files/{file}.json"),
        cells=out("qc/{dataset}/files/{file}.cells.parquet"),
    log:
        out("logs/preprocess/{dataset}/{file}.log"),
    benchmark:
        out("benchmarks/preprocess/{dataset}/{file}.tsv")
    conda:
        "../../envs/prep.yaml"
    resources:
        # Memory and time follow the input's size (the profile may override them); the block
        # size is a runtime setting of the profile, it changes memory, never results.
        mem_mb=preprocess_mem_mb,
        runtime=preprocess_runtime,
        block_cells=4096,
    params:
        path=file_path,
        planning_error=planning_error,
        species=species_of,
        settings=preprocess_settings,
        n_bins=config["shards"]["n_bins"],
        tie_break=config["shards"]["tie_break"],
        seed=config["seed"],
        exact_max_cells=config["gene_stats"]["exact_max_cells"],
        version=formats.PREPROCESS,
    shell:
        "python -m cellfoundry preprocess --dataset {wildcards.dataset} --file {wildcards.file} "
        "--species {params.species} --input {params.path:q} --reference={input.reference:q} "
        "--planning-error={params.planning_error:q} "
        "--settings {params.settings:q} --n-bins {params.n_bins} --tie-break {params.tie_break} "
        "--seed {params.seed} "
        "--exact-max-cells {params.exact_max_cells} --block-cells {resources.block_cells} "
        "--h5ad {output.h5ad:q} --shard {output.shard:q} --gene-stats {output.gene_stats:q} "
        "--qc {output.qc:q} --cells {output.cells:q} 2>&1 | tee {log:q}"


rule aggregate_dataset:
    input:
        qc=per_file("qc/{dataset}/files/{file}.json"),
        cells=per_file("qc/{dataset}/files/{file}.cells.parquet"),
        gene_stats=per_file("stats/files/{dataset}/{file}.parquet"),
        shards=per_file("shards/{dataset}/{file}"),
        reference=reference_of,
    output:
        gene_stats=out("stats/datasets/{dataset}.parquet"),
        qc=out("qc/{dataset}/qc.json"),
        qc_plot=report(
            out("qc/{dataset}/qc.png"),
            caption="../report/qc.rst",
            category="1. Quality control",
            labels={"dataset": "{dataset}"},
        ),
        provenance=out("provenance/{dataset}.json"),
        manifest=out("shards/{dataset}/manifest.json"),
    log:
        out("logs/aggregate_dataset/{dataset}.log"),
    conda:
        "../../envs/prep.yaml"
    params:
        path=dataset_path,
        species=species_of,
        settings=preprocess_settings,
        exact_max_cells=config["gene_stats"]["exact_max_cells"],
        h5ad_dir=out("data/{dataset}/h5ads"),
        version=formats.PREPROCESS,
    shell:
        "python -m cellfoundry aggregate --dataset {wildcards.dataset} --species {params.species} "
        "--input {params.path:q} --settings {params.settings:q} --h5ad-dir {params.h5ad_dir:q} "
        "--exact-max-cells {params.exact_max_cells} --reference-source={input.reference:q} "
        "--file-qc {input.qc:q} --file-stats {input.gene_stats:q} --shards {input.shards:q} "
        "--gene-stats {output.gene_stats:q} --qc {output.qc:q} --qc-plot {output.qc_plot:q} "
        "--provenance {output.provenance:q} --shard-manifest {output.manifest:q} > {log:q} 2>&1"


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
    params:
        exact_max_cells=config["gene_stats"]["exact_max_cells"],
        version=formats.GENE_STATS,
    shell:
        "python -m cellfoundry gene-stats --species {wildcards.species} --inputs {input.stats:q} "
        "--exact-max-cells {params.exact_max_cells} --out {output.stats:q} "
        "--summary {output.summary:q} --medians={input.medians:q} 2>&1 | tee {log:q}"
