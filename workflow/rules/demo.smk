rule demo_corpus:
    output:
        DEMO_FILES,
    log:
        out("logs/demo_corpus.log"),
    conda:
        "../../envs/prep.yaml"
    params:
        seed=config["seed"],
        n_cells=demo_cells_argument(),
        out=demo_folder,
    shell:
        "python -m cellfoundry demo --out {params.out:q} --seed {params.seed} {params.n_cells} > {log:q} 2>&1"
