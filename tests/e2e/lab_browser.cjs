// JupyterLab in Debian's headless chromium (playwright-core, no browser download): open a
// notebook whose kernel is a cellbox kernel, run its cells, wait for the plot, take a screenshot.
// Input (env): LAB_URL, LAB_TOKEN, NOTEBOOK (path in Lab's root), SCREENSHOT (png path),
// PLAYWRIGHT_CORE (the module's directory). Prints one JSON line: what the page showed.
"use strict";
const { chromium } = require(process.env.PLAYWRIGHT_CORE);

const TIMEOUT = 90_000;

async function main() {
  const browser = await chromium.launch({
    executablePath: "/usr/bin/chromium",
    headless: true,
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-default-apps",
      "--disable-sync",
      "--no-first-run",
      "--metrics-recording-only",
      "--disable-dev-shm-usage",
    ],
  });
  const out = { ok: false };
  try {
    const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
    page.setDefaultTimeout(TIMEOUT);
    const url = `${process.env.LAB_URL}/lab/tree/${process.env.NOTEBOOK}?token=${process.env.LAB_TOKEN}&reset`;
    await page.goto(url, { waitUntil: "domcontentloaded" });
    // the kernel is up when the status bar stops saying "Connecting"/"Starting" and shows Idle
    await page.waitForSelector(".jp-Notebook .jp-Cell .cm-content");
    await page.waitForFunction(
      () => /Idle/.test(document.querySelector(".jp-StatusBar-TextItem, #jp-main-statusbar")?.textContent ?? ""),
      null,
      { timeout: TIMEOUT },
    );
    await page.click(".jp-Notebook");
    // Run All Cells, from the command palette's keyboard shortcut-free route: the menu
    await page.click("text=Run", { timeout: TIMEOUT });
    await page.click("text=Run All Cells");
    await page.waitForSelector(".jp-OutputArea-output img", { timeout: TIMEOUT });
    await page.waitForSelector(".jp-OutputArea-output:has-text('cellbox-ok')", { timeout: TIMEOUT });
    const img = await page.$eval(".jp-OutputArea-output img", (el) => ({
      src: el.getAttribute("src")?.slice(0, 22),
      width: el.naturalWidth,
      height: el.naturalHeight,
    }));
    out.img = img;
    out.kernel = await page.$eval(".jp-KernelName, .jp-Toolbar-kernelName", (el) => el.textContent).catch(() => null);
    await page.screenshot({ path: process.env.SCREENSHOT, fullPage: false });
    out.ok = true;
  } catch (err) {
    out.error = String(err && err.stack ? err.stack : err);
    try {
      const pages = browser.contexts().flatMap((c) => c.pages());
      if (pages[0]) await pages[0].screenshot({ path: process.env.SCREENSHOT });
    } catch (_) {}
  } finally {
    await browser.close();
  }
  process.stdout.write(JSON.stringify(out) + "\n");
  process.exit(out.ok ? 0 : 1);
}

main();
