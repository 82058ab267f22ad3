#!/usr/bin/env python3
"""The dashboard page (`GET /`) in a real headless browser: Debian's `chromium` driven by
`chromium-driver` through Selenium.

    python3 tests/dashboard.py HOST:PORT OUTDIR

against `flow-node cluster` (device -> edge -> cloud). Checks that the page loads without
console errors, that the topology shows the three tiers (the cloud and the edge -> cloud
link as the edge reports them) and both links, that a chat answer streams in with
every token coloured by a tier and exit, and that the live numbers move (the tokens counter
grows after the answer). Writes OUTDIR/dashboard.png. With AIFLOW_API_KEY set, the server is
expected to require it: the page must ask for the key before it shows any data.

Needs: python3 -m pip install selenium; apt-get install chromium chromium-driver.
"""

import os
import shutil
import sys
import time

from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

QUESTION = "Name three primary colours and say one thing about each."
MAX_TOKENS = "40"
TIERS = {"device", "edge", "cloud"}


def browser() -> webdriver.Chrome:
    opts = Options()
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--window-size=1400,1000", "--force-device-scale-factor=1",
              "--force-prefers-reduced-motion", "--blink-settings=preferredColorScheme=1"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary:
        opts.binary_location = binary
    driver = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    return webdriver.Chrome(service=Service(driver), options=opts)


def wait(d, what, until, timeout=20.0):
    try:
        return WebDriverWait(d, timeout, poll_frequency=0.1).until(lambda _: until())
    except TimeoutException:
        raise SystemExit(f"FAIL: timed out after {timeout:.0f} s waiting for {what}")


def text(d, id_):
    return d.find_element(By.ID, id_).text


def number(d, id_):
    t = text(d, id_).replace(",", "").strip()
    return int(t) if t.isdigit() else None


def check(cond, msg):
    if not cond:
        raise SystemExit(f"FAIL: {msg}")
    print(f"ok: {msg}")


def main() -> None:
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    host, outdir = sys.argv[1], sys.argv[2]
    os.makedirs(outdir, exist_ok=True)
    key = os.environ.get("AIFLOW_API_KEY")
    t0 = time.monotonic()
    d = browser()
    try:
        d.get(f"http://{host}/")
        check(d.title == "aiflow dashboard", "the page loads")
        if key:
            form = d.find_element(By.ID, "key-form")
            wait(d, "the API key form", form.is_displayed)
            check(d.find_element(By.ID, "conn").get_attribute("data-state") == "key",
                  "without a key the page asks for one")
            d.find_element(By.ID, "key").send_keys(key)
            form.submit()
        wait(d, "the first status", lambda: d.find_element(By.TAG_NAME, "body")
             .get_attribute("data-ready") == "1")
        # the edge reports its cloud link (protocol 3) within a few probe rounds
        wait(d, "the cloud as the edge reports it",
             lambda: d.find_elements(By.CSS_SELECTOR, '#topology .node[data-seen="reported"]'))
        nodes = [(e.get_attribute("data-role"), e.get_attribute("data-seen"))
                 for e in d.find_elements(By.CSS_SELECTOR, "#topology .node")]
        check(nodes == [("device", "self"), ("edge", "hello"), ("cloud", "reported")],
              f"the topology shows three tiers, the cloud as the edge sees it: {nodes}")
        check(d.find_element(By.ID, "conn").get_attribute("data-state") == "live",
              "the status is live")
        links = [e.text for e in d.find_elements(By.CSS_SELECTOR, "#links tr[data-addr]")]
        check(len(links) == 2 and links[0].startswith("device → edge")
              and links[1].startswith("edge → cloud"),
              f"both links are listed, device → edge and edge → cloud: {links}")
        legend = text(d, "legend")
        check(all(t in legend for t in TIERS), f"the legend names every tier: {legend!r}")

        before = number(d, "s-tokens")
        check(before is not None, f"the tokens counter shows a number ({before})")
        mt = d.find_element(By.ID, "max-tokens")
        mt.clear()
        mt.send_keys(MAX_TOKENS)
        d.find_element(By.ID, "prompt").send_keys(QUESTION)
        d.find_element(By.ID, "send").click()
        chat = d.find_element(By.ID, "chat")
        wait(d, "a streamed token",
             lambda: d.find_elements(By.CSS_SELECTOR, "#transcript .tok"), timeout=60)
        wait(d, "the end of the answer",
             lambda: chat.get_attribute("data-state") in ("done", "error"), timeout=90)
        check(chat.get_attribute("data-state") == "done",
              f"the answer completes ({text(d, 'transcript')[-200:]!r})")
        spans = d.find_elements(By.CSS_SELECTOR, "#transcript .tok")
        tiers = {s.get_attribute("data-tier") for s in spans}
        check(spans and tiers <= TIERS, f"{len(spans)} token spans, tiers {sorted(tiers)}")
        for s in spans:
            cls = s.get_attribute("class").split()
            assert f"tier-{s.get_attribute('data-tier')}" in cls, cls
            assert s.get_attribute("data-exit").isdigit(), s.get_attribute("data-exit")
        colours = {
            s.get_attribute("data-tier"): s.value_of_css_property("border-bottom-color")
            for s in spans
        }
        check(len(set(colours.values())) == len(colours),
              f"each tier has its own colour: {colours}")
        answer = "".join(s.text for s in spans)
        print(f"answer: {answer!r}")
        check(text(d, "answer-meta").startswith("finished:"),
              f"the answer's summary: {text(d, 'answer-meta')!r}")

        wait(d, "the tokens counter to grow",
             lambda: (number(d, "s-tokens") or 0) >= (before or 0) + len(spans), timeout=5)
        check(True, f"tokens counter {before} -> {number(d, 's-tokens')}")
        rows = d.find_elements(By.CSS_SELECTOR, "#tokens tr")
        check(any(r.text for r in rows), "tokens by tier and exit are listed")

        # With a key, the page's first status poll is refused (that is how it learns to ask).
        severe = [e for e in d.get_log("browser") if e.get("level") == "SEVERE"
                  and not (key and "/aiflow/status" in e.get("message", "")
                           and "401" in e.get("message", ""))]
        check(not severe, f"no console errors {severe}")

        # The window as tall as the page (plus the window's own chrome, if any).
        content, chrome = d.execute_script(
            "const m = document.querySelector('main').getBoundingClientRect();"
            "return [Math.ceil(m.bottom + window.scrollY), window.outerHeight - window.innerHeight];")
        d.set_window_size(1400, min(int(content) + int(chrome), 2400))
        time.sleep(1.2)  # one more poll: rates from two snapshots after the answer
        path = os.path.join(outdir, "dashboard.png")
        d.save_screenshot(path)
        print(f"ok: screenshot {path} ({time.monotonic() - t0:.1f} s)")
    finally:
        d.quit()


if __name__ == "__main__":
    main()
