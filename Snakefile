# cellfoundry: single-cell datasets -> scConcept project (tokenized shards, vocabularies,
# panels, splits) -> gene embeddings -> a pretrained transcriptomic foundation model.
from snakemake.utils import min_version

min_version("9.27")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"


# Names are validated (sheet) or made safe (inputs); these patterns keep paths unambiguous and
# are character classes, not lists of names, so planning stays fast with thousands of datasets.
wildcard_constraints:
    dataset="[A-Za-z0-9][A-Za-z0-9_-]*",
    file=r"(?!manifest\.json$)[A-Za-z0-9._+-]+",
    species="[a-z][a-z0-9_]*",
    embedding="|".join(re.escape(name) for name in sorted(config["embeddings"]))
    or "(?!)",


include: "workflow/rules/demo.smk"
include: "workflow/rules/reference.smk"
include: "workflow/rules/preprocess.smk"
include: "workflow/rules/vocabulary.smk"
include: "workflow/rules/panels.smk"
include: "workflow/rules/splits.smk"
include: "workflow/rules/shards.smk"
include: "workflow/rules/embeddings.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/lamin.smk"


rule all:
    default_target: True
    input:
        prep_outputs(),
        embedding_outputs(),
        model_outputs(),
        lamin_outputs(),


rule prep:
    input:
        prep_outputs(),
