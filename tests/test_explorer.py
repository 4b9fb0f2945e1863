"""The explorer page in a real headless Chromium (Debian's chromium and chromedriver, driven by selenium).

The page must load with no console error and no network request, show the model's tokens, layers and
heads, show attention values equal to the trace's, react to clicks, and stay usable on a 48-layer x
25-head model in its top-keys mode. A screenshot of each page is kept in test-artifacts/.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from checkpoints import TOKENIZER_DIR, make_hf_model, write_checkpoint
from mlx_gpt2 import load
from mlx_gpt2.analysis.explorer import explorer_data, render_page
from mlx_gpt2.analysis.hooks import run_with_cache
from mlx_gpt2.analysis.trace import token_label, trace
from mlx_gpt2.cli import app

TEXT = "The animal didn't cross the street because it was too tired"
HOSTILE = "</script><script>alert(1)</script><img src=x onerror=alert(2)> <!-- é🙂\n\t& done"
ARTIFACTS = Path(os.environ.get("MLX_GPT2_TEST_ARTIFACTS", Path(__file__).resolve().parent.parent / "test-artifacts"))
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium, logging the console and every network request."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if shutil.which(p) is None]
    assert not missing, f"{missing} missing: apt-get install chromium chromium-driver (.ci/run does)"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1280,1800"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def small_tokenizer(directory: Path, size: int) -> None:
    """GPT-2's BPE cut to `size` tokens: the 256 bytes, the merges that made the next ones, <|endoftext|> last."""
    vocab = json.loads((TOKENIZER_DIR / "vocab.json").read_text(encoding="utf-8"))
    kept = {t: i for t, i in vocab.items() if i < size - 1} | {"<|endoftext|>": size - 1}
    (directory / "vocab.json").write_text(json.dumps(kept), encoding="utf-8")
    lines = (TOKENIZER_DIR / "merges.txt").read_text(encoding="utf-8").splitlines()
    (directory / "merges.txt").write_text("\n".join(lines[: 1 + size - 1 - 256]) + "\n", encoding="utf-8")


def open_page(driver, path: Path) -> None:
    driver.get(path.as_uri())
    assert driver.execute_script("return document.body.dataset.ready") == "1", "the page's script did not finish"


def errors_and_requests(driver, path: Path) -> tuple[list, list]:
    """Console messages at error level, and every URL the page asked for besides itself."""
    errors = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
    events = [json.loads(e["message"])["message"] for e in driver.get_log("performance")]
    urls = [e["params"]["request"]["url"] for e in events if e["method"] == "Network.requestWillBeSent"]
    return errors, [u for u in urls if u != path.as_uri()]


def page_json(path: Path, element: str):
    """One of the page's JSON blocks, read from the file (the data the DOM is checked against)."""
    match = re.search(rf'<script type="application/json" id="{element}">(.*?)</script>', path.read_text(encoding="utf-8"), re.S)
    return json.loads(match.group(1))


def attention_values(driver) -> dict[int, float]:
    cells = driver.find_elements("css selector", "#attn-values .attn-value")
    return {int(c.get_attribute("data-key")): float(c.text) for c in cells}


def texts(driver, selector: str) -> list[str]:
    return [e.get_attribute("textContent") for e in driver.find_elements("css selector", selector)]


def screenshot(driver, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    assert driver.save_screenshot(str(ARTIFACTS / name))


def test_the_page_in_chromium(browser, small_converted, small_loaded, tmp_path):
    out = tmp_path / "page.html"
    result = CliRunner().invoke(app, ["inspect", "html", TEXT, "--model", str(small_converted), "--out", str(out)])
    assert result.exit_code == 0, result.output
    model, tokenizer = small_loaded
    t = trace(model, tokenizer, TEXT)
    summary = page_json(out, "summary")
    assert summary["tokens"] == [token_label(s) for s in t.tokens] and summary["token_ids"] == t.token_ids
    # no script, style or font from anywhere but the file itself
    assert not re.search(r'(src|href)="(?!data:)', out.read_text(encoding="utf-8"))

    open_page(browser, out)
    assert texts(browser, "#token-strip .tok") == summary["tokens"]
    assert browser.find_element("id", "n-layers").text == "2" and browser.find_element("id", "n-heads").text == "4"
    rows = browser.find_elements("css selector", "#attn-grid .grid-row")
    assert len(rows) == 2 and all(len(r.find_elements("css selector", ".grid-cell")) == 4 for r in rows)
    it = t.tokens.index(" it")
    assert browser.find_element("id", "selected-pos").text == str(it)  # the example's "it" is selected first

    def check(layer: int, head: int, query: int) -> None:
        shown = attention_values(browser)
        assert sorted(shown) == list(range(query + 1))  # every earlier key, none from the future
        diff = max(abs(v - t.attentions[layer, head, query, k]) for k, v in shown.items())
        print(f"OK, maxdiff = {diff:.1e} (DOM vs trace, layer {layer} head {head} query {query})")
        assert diff <= 5e-4 + 1e-6  # shown with three decimals, stored as thousandths

    check(0, 0, it)
    scores = [float(c.text) for c in browser.find_elements("css selector", "#score-table td.score")]
    q, k = t.q[0, 0, it], t.k[0, 0, : it + 1]
    assert np.abs(np.array(scores) - k @ q / np.sqrt(q.size)).max() <= 0.01  # q.k / sqrt(d), 2 decimals shown
    browser.find_element("css selector", '#attn-grid .grid-cell[data-layer="1"][data-head="2"]').click()
    check(1, 2, it)
    browser.find_element("css selector", '#token-strip .tok[data-pos="3"]').click()
    assert browser.find_element("id", "selected-token").text == summary["tokens"][3]
    check(1, 2, 3)
    lens = texts(browser, "#lens-table tr:nth-child(2) td")[2:]
    assert lens == summary["lens"]["tokens"][0][: len(lens)]
    screenshot(browser, "explorer.png")
    errors, requests = errors_and_requests(browser, out)
    assert errors == [] and requests == [], (errors, requests)


def test_a_hostile_text_stays_text(browser, small_loaded, tmp_path):
    model, tokenizer = small_loaded
    out = tmp_path / "hostile.html"
    out.write_text(render_page(explorer_data(model, tokenizer, HOSTILE, name="<b>x</b>")), encoding="utf-8")
    open_page(browser, out)
    expected = [token_label(tokenizer.decode([i])) for i in tokenizer.encode(HOSTILE)]
    assert texts(browser, "#token-strip .tok") == expected
    assert browser.find_element("id", "title").text == "Inside <b>x</b>"
    assert browser.execute_script("return document.querySelectorAll('img').length") == 0
    errors, requests = errors_and_requests(browser, out)
    assert errors == [] and requests == [], (errors, requests)


def test_48_layers_of_25_heads_at_length(browser, tmp_path):
    """gpt2-xl's attention shape (50 wide, for speed), long enough that the page keeps top keys per head."""
    # A 1000-token vocabulary: the logit lens's 49 unembeddings are the cost otherwise (the bundled BLAS)
    hf = make_hf_model({"n_layer": 48, "n_head": 25, "n_embd": 50, "n_positions": 256, "vocab_size": 1000,
                         "bos_token_id": 999, "eos_token_id": 999}, seed=3)
    directory = write_checkpoint(hf, tmp_path / "xl-shape", "hub", tokenizer=False)
    small_tokenizer(directory, 1000)
    model, tokenizer = load(directory)
    ids = tokenizer.encode(Path(__file__).read_text(encoding="utf-8"))[:80]
    data = explorer_data(model, tokenizer, ids)
    assert data["top_keys"] and data["top_keys"] < 80
    out = tmp_path / "wide.html"
    out.write_text(render_page(data), encoding="utf-8")
    print(f"48 x 25 heads, 80 tokens: {out.stat().st_size / 1e6:.1f} MB, {data['top_keys']} keys per query and head")
    open_page(browser, out)
    rows = browser.find_elements("css selector", "#attn-grid .grid-row")
    assert len(rows) == 48 and len(rows[-1].find_elements("css selector", ".grid-cell")) == 25
    browser.find_element("css selector", '#attn-grid .grid-cell[data-layer="47"][data-head="24"]').click()
    shown = attention_values(browser)
    probs = run_with_cache(model, ids, names=["h.47.attn.pattern"])[1].numpy("h.47.attn.pattern")[0, 24, 79]
    strongest = np.argsort(-probs)[: data["top_keys"]]  # the last token is selected first
    assert max(abs(shown[int(k)] - probs[k]) for k in strongest) <= 5e-4 + 1e-6
    browser.find_element("css selector", '#token-strip .tok[data-pos="60"]').click()
    assert browser.find_element("id", "selected-pos").text == "60"
    screenshot(browser, "explorer-48x25.png")
    errors, requests = errors_and_requests(browser, out)
    assert errors == [] and requests == [], (errors, requests)
