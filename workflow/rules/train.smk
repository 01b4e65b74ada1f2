rule train:
    input:
        manifest=out("manifests/shards.parquet"),
        token_mappings=expand(
            out("references/vocabulary/token_mappings_per_specie/{species}.csv"),
            species=SPECIES,
        ),
        summaries=expand(
            out("stats/species/{species}.summary.parquet"), species=SPECIES
        ),
        references=expand(out("references/genes/{species}.parquet"), species=SPECIES),
        gene_embeddings=training_gene_embeddings(),
        panels=training_panels(),
        eval_files=evaluation_files(),
    output:
        model=out(f"model_checkpoints/{TRAIN_RUN}/final/model.safetensors"),
        config=out(f"model_checkpoints/{TRAIN_RUN}/final/config.json"),
    log:
        out(f"logs/train/{TRAIN_RUN}.log"),
    benchmark:
        out(f"benchmarks/train/{TRAIN_RUN}.tsv")
    conda:
        "../../envs/train.yaml"
    resources:
        # The profile sets these: `launcher` (python, torchrun or srun with the task layout),
        # devices per node and nodes. They are resources, not params, so switching profiles
        # does not rerun training. The trainer itself decides whether a rerun continues the
        # run's checkpoints or starts a new identity (old files are moved aside, never deleted).
        launcher="python",
        devices=1,
        num_nodes=1,
    params:
        settings=as_json(config["train"]),
        seed=config["seed"],
        run_dir=run_dir_of_model,
        evaluation=as_json(config["eval"]),
    # tee: progress lines (step, loss, cells/s, ETA) on the terminal of a local run and in
    # the log; on Slurm in the job's output file too.
    shell:
        "{resources.launcher} -m cellfoundry train --settings {params.settings:q} --seed {params.seed} "
        "--manifest {input.manifest:q} --token-mappings {input.token_mappings:q} "
        "--summaries {input.summaries:q} --references {input.references:q} "
        "--gene-embeddings {input.gene_embeddings:q} --panels {input.panels:q} "
        "--run-dir {params.run_dir:q} --eval {params.evaluation:q} --devices {resources.devices} --num-nodes {resources.num_nodes} "
        "2>&1 | tee {log:q}"
