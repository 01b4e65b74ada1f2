"""Format versions of each stage's outputs.

Each is a param of the stage's rule: bumping one reruns that stage on purpose (Snakemake does
not notice edits to package code called from `shell:`). Kept in a module of its own, without
heavy imports, because the workflow reads them while it plans.
"""

# Preprocessed h5ads, per-file statistics and QC records (`preprocess.preprocess_file`).
PREPROCESS = 2
# Training shards (`shards.ShardWriter`): packed entries, written with the h5ad.
SHARDS = 2
# Merged gene statistics (`gene_stats`): exact values, then log2 histograms.
GENE_STATS = 2
