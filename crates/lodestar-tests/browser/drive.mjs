// Drives headless Chromium (Debian's, never a downloaded one) with
// playwright-core for the browser tests (lodestar_tests::browser), and
// prints what a page showed as one line of JSON.
//
//   node drive.mjs example URL   examples/route-guide's page: its four calls' results
//   node drive.mjs probe URL     a test page that leaves its results as JSON in #results
//
// Environment: LODESTAR_PLAYWRIGHT, a node_modules folder holding
// playwright-core; LODESTAR_CHROMIUM, the browser (default /usr/bin/chromium).
import { createRequire } from "node:module";

const [mode, url] = process.argv.slice(2);
if (!["example", "probe"].includes(mode) || !url) {
  console.error("usage: node drive.mjs example|probe URL");
  process.exit(2);
}
const modules = process.env.LODESTAR_PLAYWRIGHT;
if (!modules) {
  console.error("LODESTAR_PLAYWRIGHT must name a node_modules folder with playwright-core");
  process.exit(2);
}
const { chromium } = createRequire(`${modules}/`)("playwright-core");

// Every wait is bounded.
const TIMEOUT_MS = 30_000;
const watchdog = setTimeout(() => {
  console.error(`gave up after ${2 * TIMEOUT_MS} ms`);
  process.exit(3);
}, 2 * TIMEOUT_MS);

const browser = await chromium.launch({
  executablePath: process.env.LODESTAR_CHROMIUM || "/usr/bin/chromium",
  timeout: TIMEOUT_MS,
});
try {
  const page = await browser.newPage();
  page.setDefaultTimeout(TIMEOUT_MS);
  // What the browser says about refused requests (CORS, WebSocket openings).
  const consoleMessages = [];
  page.on("console", (message) => {
    if (message.type() === "error" || message.type() === "warning") {
      consoleMessages.push(message.text().slice(0, 500));
    }
  });
  page.on("pageerror", (error) => consoleMessages.push(`page error: ${error.message}`.slice(0, 500)));

  await page.goto(url);
  await page.waitForSelector('body[data-state="done"], body[data-state="failed"]');
  const state = await page.getAttribute("body", "data-state");
  let result;
  if (mode === "example") {
    result = await page.evaluate(() => {
      const text = (selector) => document.querySelector(selector)?.textContent ?? null;
      const sections = {};
      for (const section of document.querySelectorAll("section")) {
        sections[section.id] = section.dataset.state;
      }
      return {
        sections,
        errors: [...document.querySelectorAll('[data-field="error"]')].map((e) => e.textContent),
        feature: text('#get-feature [data-field="name"]'),
        listed: document.querySelectorAll("#list-features li").length,
        listedShown: text('#list-features [data-field="count"]'),
        pointCount: text('#record-route [data-field="pointCount"]'),
        chat: [...document.querySelectorAll('#route-chat [data-field="message"]')].map((e) => e.textContent),
      };
    });
  } else {
    result = JSON.parse((await page.textContent("#results")) || "{}");
  }
  console.log(JSON.stringify({ state, ...result, console: consoleMessages }));
} finally {
  await browser.close();
  clearTimeout(watchdog);
}
