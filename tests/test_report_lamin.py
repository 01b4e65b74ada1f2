"""LaminDB as a source and a registry, and the report people look at, in a real browser.

One small project runs the whole pipeline: two datasets come from plain files, two from a real
local LaminDB instance (an artifact and a collection), and every output is registered in the
project's own instance. Then `snakemake --report` builds the report, which headless Chromium
opens and clicks through.
"""

from __future__ import annotations

import json
import shutil
import sys
import textwrap

import numpy as np
import pytest

from cellfoundry.demo import DEMO_DATASETS
from conftest import REPO, SMALL_PROJECT, Project, run

pytestmark = [pytest.mark.slow, pytest.mark.lamin]

SOURCE = """
import sys
from pathlib import Path
from cellfoundry.demo import write_demo_corpus
from cellfoundry.lamin import init_instance

storage, settings = Path(sys.argv[1]), Path(sys.argv[2])
write_demo_corpus(storage / "corpus", seed=7, n_cells=120)
init_instance(storage, name="corpus", settings_dir=settings)
import lamindb as ln

ln.Artifact(storage / "corpus" / "demo_pbmc_symbols.h5ad", key="corpus/pbmc_symbols.h5ad").save()
looms = [ln.Artifact(p, key=f"corpus/retina/{p.name}").save() for p in sorted((storage / "corpus" / "demo_retina").glob("*.loom"))]
ln.Collection(looms, key="retina").save()
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Project:
    pytest.importorskip("lamindb")
    root = tmp_path_factory.mktemp("lamin-report")
    source, settings = root / "source", root / "source-settings"
    made = run(
        [sys.executable, "-c", textwrap.dedent(SOURCE), str(source), str(settings)], cwd=root
    )
    assert made.returncode == 0, made.stdout[-3000:]
    rows = [
        {"dataset": d.name, "species": d.species, "path": str(root / "demo" / d.path)}
        for d in DEMO_DATASETS
        if d.name in ("demo_pbmc_ids", "demo_brain")
    ]
    rows += [
        {
            "dataset": "lamin_pbmc",
            "species": "hsapiens",
            "path": "lamin://artifact/corpus/pbmc_symbols.h5ad",
        },
        {"dataset": "lamin_retina", "species": "mmusculus", "path": "lamin://collection/retina"},
    ]
    lamin = {
        "register": True,
        "source_instance": "anonymous/corpus",
        "source_settings_dir": str(settings),
    }
    project = Project(root, rows, {**SMALL_PROJECT, "lamin": lamin})
    result = project.snakemake(timeout=2400)
    assert result.returncode == 0, result.stdout[-6000:]
    report = project.snakemake("--report", str(root / "report.html"))
    assert report.returncode == 0, report.stdout[-3000:]
    return project


def test_lamin_datasets_are_materialised(project):
    retina = sorted(
        p.name for p in (project.results / "data" / "lamin_retina" / "h5ads").glob("*.h5ad")
    )
    assert retina == ["retina_batch1.h5ad", "retina_batch2.h5ad"]
    provenance = json.loads((project.results / "provenance" / "lamin_pbmc.json").read_text())
    assert provenance["config"]["input"] == "lamin://artifact/corpus/pbmc_symbols.h5ad"
    assert provenance["inputs"][0]["file"].endswith("pbmc_symbols.h5ad")


def test_model_lineage_names_its_training_data(project):
    result = run(
        [sys.executable, "-m", "cellfoundry", "lamin-lineage", "--project", str(project.results), "--name",
         "cellfoundry", "--artifact", str(project.results / "model_checkpoints" / "demo" / "final")],
        cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout
    keys = [line.split("\t")[0] for line in result.stdout.splitlines() if "\t" in line]
    for name in ("demo_pbmc_ids", "demo_brain", "lamin_pbmc"):
        assert any(k.startswith(f"data/{name}/h5ads/") for k in keys), keys
    assert "references/vocabulary/token_mappings_per_specie/hsapiens.csv" in keys
    # ... and, one step further back, the raw files the h5ads were made from.
    assert any(k.endswith("demo_pbmc_ids.h5ad") and not k.startswith("data/") for k in keys), keys


def test_registration_is_idempotent(project):
    receipt = project.results / "lamin" / "model" / "demo.json"
    first = json.loads(receipt.read_text())
    again = project.snakemake(
        "--forcerun", "lamin_register_model", "--until", "lamin_register_model"
    )
    assert again.returncode == 0, again.stdout[-3000:]
    second = json.loads(receipt.read_text())
    assert second["reused"] is True
    assert second["outputs"] == first["outputs"] and second["run"] == first["run"]


def test_unknown_lamin_reference_fails_its_dataset(project, tmp_path):
    rows = [
        *project.datasets,
        {"dataset": "missing", "species": "hsapiens", "path": "lamin://artifact/corpus/nope.h5ad"},
    ]
    config = project.write(rows, project.config, name="-missing")
    result = project.snakemake("--until", "preprocess", config=config)
    assert result.returncode != 0
    (log_file,) = (project.results / "logs" / "preprocess" / "missing").glob("*.log")
    log = log_file.read_text()
    assert "lamin://artifact/corpus/nope.h5ad" in log
    assert not (project.results / "data" / "missing").exists()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    webdriver = pytest.importorskip("selenium.webdriver")
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("needs Debian's chromium and chromium-driver")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = chromium
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium')}",
        "--window-size=1400,1000",
    ):
        options.add_argument(argument)
    session = webdriver.Chrome(service=Service(driver), options=options)
    yield session
    session.quit()


@pytest.mark.browser
def test_report_renders_every_plot_in_a_browser(project, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    report = project.root / "report.html"
    assert "http://" not in report.read_text().split("<script", 1)[0]  # self-contained head
    wait = WebDriverWait(browser, 60)
    browser.get(report.as_uri())
    wait.until(ec.element_to_be_clickable((By.LINK_TEXT, "1. Quality control")))
    seen: dict[str, int] = {}
    tables: dict[str, list[str]] = {}
    shown_before: set[str] = set()
    for category in ("1. Quality control", "2. Corpus", "3. Training", "4. Cell embeddings"):
        browser.get(report.as_uri())
        wait.until(ec.element_to_be_clickable((By.LINK_TEXT, category))).click()
        n = len(
            wait.until(ec.presence_of_all_elements_located((By.CSS_SELECTOR, 'a[iconname="eye"]')))
        )
        for i in range(n):
            shown = _open(browser, i, shown_before)
            shown_before.add(shown)
            seen[category] = seen.get(category, 0) + 1
            if shown.startswith("iframe"):
                browser.switch_to.frame(browser.find_element(By.TAG_NAME, "iframe"))
                rows = wait.until(
                    ec.presence_of_all_elements_located((By.CSS_SELECTOR, "tbody tr"))
                )
                tables[category] = [r.text for r in rows]
                browser.switch_to.default_content()
        browser.save_screenshot(str(tmp_path / f"{category[0]}.png"))
    assert seen == {
        "1. Quality control": 4,
        "2. Corpus": 1,
        "3. Training": 1,
        # Per labelled dataset (4): its UMAP and its metrics during training; one table.
        "4. Cell embeddings": 9,
    }
    # The corpus page lists every dataset (and both species); the embeddings page the labelled ones.
    corpus = "\n".join(tables["2. Corpus"])
    assert all(
        name in corpus
        for name in ("demo_pbmc_ids", "demo_brain", "lamin_pbmc", "lamin_retina", "mmusculus")
    )
    assert any(row.startswith("lamin_retina") for row in tables["4. Cell embeddings"])
    # The screenshot of the embeddings shows a picture, not an empty page.
    from PIL import Image

    pixels = np.asarray(Image.open(tmp_path / "4.png").convert("L"), dtype=float)
    assert pixels.std() > 10


def _open(browser, i: int, shown_before: set[str], attempts: int = 6) -> str:
    """Click the i-th result's eye and return the key of what it shows, which must be new.

    A click can land while the page is still re-rendering (a slow machine) and be lost, so an
    unanswered click is repeated; a result that never shows fails after all attempts."""
    from selenium.common.exceptions import WebDriverException  # TimeoutException included
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    for _ in range(attempts):
        try:
            browser.find_elements(By.CSS_SELECTOR, 'a[iconname="eye"]')[i].click()
            return WebDriverWait(browser, 10).until(lambda b: _new_shown(b, shown_before))
        except WebDriverException:
            continue
    raise AssertionError(f"result {i} never showed anything new (seen: {sorted(shown_before)})")


def _new_shown(browser, shown_before: set[str]) -> str | bool:
    """The key of a result on screen that was not shown before, or False."""
    return next((key for key in _shown(browser) if key not in shown_before), False)


def _shown(browser) -> list[str]:
    """Keys of the results on screen: decoded PNGs (by their data) and HTML pages in iframes."""
    return browser.execute_script(
        """
        const images = Array.from(document.images).filter(
            i => i.src.startsWith('data:image/png') && i.complete && i.naturalWidth > 100);
        const frames = Array.from(document.querySelectorAll('iframe'));
        return images.map(i => 'img:' + i.src.length + ':' + i.src.slice(-64)).concat(
            frames.map(f => 'iframe:' + f.src.length + ':' + f.src.slice(-64)));
        """
    )
