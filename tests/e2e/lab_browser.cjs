// JupyterLab in Debian's headless chromium (playwright-core, no browser download): open a
// notebook whose kernel is a cellbox kernel, run its cells, check what the page shows, take a
// screenshot.
// Input (env): LAB_URL, LAB_TOKEN, NOTEBOOK (path in Lab's root), SCREENSHOT (png path),
// PLAYWRIGHT_CORE (the module's directory), SCENARIO ("plot", the default, "widgets" or
// "buffers"), UPLOAD_HEX (buffers: the bytes to upload, in hex).
// Prints one JSON line: what the page showed.
//
// Scenarios (the notebooks are written by tests/e2e/test_jupyterlab_browser.py):
// * plot: Run All Cells; a matplotlib PNG and the text "cellbox-ok" appear.
// * widgets: cell 1 displays an IntSlider(5); the page edits its readout to 6 (browser → kernel
//   comm_msg); cell 2 prints the kernel's s.value; cell 3 sets s.value = 7 (kernel → browser
//   comm_msg) and the readout must follow.
// * buffers: see buffers() below.
"use strict";
const { chromium } = require(process.env.PLAYWRIGHT_CORE);

const TIMEOUT = 90_000;
const SHORT = 20_000;

async function openNotebook(page) {
  const url = `${process.env.LAB_URL}/lab/tree/${process.env.NOTEBOOK}?token=${process.env.LAB_TOKEN}&reset`;
  await page.goto(url, { waitUntil: "domcontentloaded" });
  // the kernel is up when the status bar stops saying "Connecting"/"Starting" and shows Idle
  await page.waitForSelector(".jp-Notebook .jp-Cell .cm-content");
  await page.waitForFunction(
    () => /Idle/.test(document.querySelector(".jp-StatusBar-TextItem, #jp-main-statusbar")?.textContent ?? ""),
    null,
    { timeout: TIMEOUT },
  );
}

async function plot(page, out) {
  await page.click(".jp-Notebook");
  // Run All Cells, from the command palette's keyboard shortcut-free route: the menu
  await page.click("text=Run", { timeout: TIMEOUT });
  await page.click("text=Run All Cells");
  await page.waitForSelector(".jp-OutputArea-output img", { timeout: TIMEOUT });
  await page.waitForSelector(".jp-OutputArea-output:has-text('cellbox-ok')", { timeout: TIMEOUT });
  out.img = await page.$eval(".jp-OutputArea-output img", (el) => ({
    src: el.getAttribute("src")?.slice(0, 22),
    width: el.naturalWidth,
    height: el.naturalHeight,
  }));
}

// Run the notebook's n-th code cell (0-based) with Shift+Enter, as a user does.
async function runCell(page, n) {
  const cell = page.locator(".jp-Notebook .jp-CodeCell").nth(n);
  await cell.locator(".cm-content").click();
  await page.keyboard.press("Shift+Enter");
  return cell;
}

async function readout(page) {
  return (await page.locator(".widget-slider .widget-readout").first().textContent())?.trim();
}

async function widgets(page, out) {
  out.steps = [];
  const first = await runCell(page, 0);
  // the widget manager (jupyterlab_widgets) rendered the slider from the kernel's comm_open
  await first.locator(".widget-slider .noUi-handle").waitFor({ timeout: TIMEOUT });
  out.rendered = await readout(page);
  out.steps.push("rendered");

  // browser → kernel: type into the readout, as a user does; the manager sends a comm_msg update
  const box = page.locator(".widget-slider .widget-readout").first();
  await box.click();
  await page.keyboard.press("Control+A");
  await page.keyboard.type("6");
  await page.keyboard.press("Enter");
  await page.waitForFunction(
    () => document.querySelector(".widget-slider .widget-readout")?.textContent?.trim() === "6",
    null,
    { timeout: SHORT },
  );
  out.steps.push("edited");

  // the kernel's side of it: cell 2 prints s.value
  const second = await runCell(page, 1);
  await second.locator(".jp-OutputArea-output:has-text('slider-value')").waitFor({ timeout: TIMEOUT });
  out.kernel_saw = (await second.locator(".jp-OutputArea-output").first().textContent())?.trim();
  out.steps.push("kernel-read");

  // kernel → browser: cell 3 sets s.value = 7; the page's slider must follow
  await runCell(page, 2);
  await page.waitForFunction(
    () => document.querySelector(".widget-slider .widget-readout")?.textContent?.trim() === "7",
    null,
    { timeout: SHORT },
  );
  out.after_kernel_set = await readout(page);
  out.steps.push("kernel-set");

}

// Binary buffers both ways: cell 1 displays an ipywidgets Image (its PNG value travels as a
// buffer of the comm message, kernel → browser); cell 2 displays a FileUpload, into which the
// page puts a file (its bytes travel as a buffer, browser → kernel); cell 3 prints them.
async function buffers(page, out) {
  out.steps = [];
  const first = await runCell(page, 0);
  const img = first.locator(".jp-OutputArea-output img.widget-image");
  await img.waitFor({ timeout: SHORT });
  await page.waitForFunction(
    () => (document.querySelector(".jp-OutputArea-output img.widget-image")?.naturalWidth ?? 0) > 0,
    null,
    { timeout: SHORT },
  );
  out.image = await img.evaluate((el) => ({ src: el.getAttribute("src")?.slice(0, 5), width: el.naturalWidth }));
  out.steps.push("image");

  const second = await runCell(page, 1);
  // the widget's file input is not in the DOM: its button opens the chooser, playwright fills it
  const button = second.locator("button.widget-upload");
  await button.waitFor({ timeout: SHORT });
  const [chooser] = await Promise.all([page.waitForEvent("filechooser", { timeout: SHORT }), button.click()]);
  await chooser.setFiles({
    name: "upload.bin",
    mimeType: "application/octet-stream",
    buffer: Buffer.from(process.env.UPLOAD_HEX, "hex"),
  });
  // the widget counts its files once it has read them and sent the update
  await second.locator(".widget-upload:has-text('(1)')").waitFor({ timeout: SHORT });
  out.steps.push("uploaded");

  const third = await runCell(page, 2);
  await third.locator(".jp-OutputArea-output:has-text('upload')").waitFor({ timeout: SHORT });
  out.kernel_saw = (await third.locator(".jp-OutputArea-output").first().textContent())?.trim();
  out.steps.push("kernel-read");
}

const SCENARIOS = { plot, widgets, buffers };

async function main() {
  const scenario = SCENARIOS[process.env.SCENARIO || "plot"];
  if (!scenario) throw new Error(`unknown SCENARIO ${process.env.SCENARIO}`);
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
  const out = { ok: false, console: [] };
  try {
    const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
    page.setDefaultTimeout(TIMEOUT);
    page.on("console", (msg) => {
      if (msg.type() === "error" && out.console.length < 20) out.console.push(msg.text().slice(0, 300));
    });
    await openNotebook(page);
    await scenario(page, out);
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
