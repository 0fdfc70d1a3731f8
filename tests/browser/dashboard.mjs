// The self-service dashboard in a real browser: Debian's headless Chromium
// (CHROMIUM, default /usr/bin/chromium) driven by playwright-core, through
// Envoy and the dialtone filter of a stack that tests/e2e/tests/dashboard.rs
// started. Exits non-zero (with the step that failed) on any broken
// expectation. Screenshots of the main states go to SCREENSHOT_DIR.
//
// Environment (set by the Rust test):
//   DIALTONE_URL     Envoy's listener, e.g. http://127.0.0.1:10000
//   ACCOUNT          the account to sign in as (has START_BALANCE credits)
//   START_BALANCE    its balance before the test
//   OTHER_PREFIX     the prefix of another account's key (must never show)
//   SCREENSHOT_DIR   where the screenshots go
import { chromium } from "playwright-core";
import assert from "node:assert/strict";
import { mkdirSync } from "node:fs";
import { join } from "node:path";
import { createRequire } from "node:module";

// axe-core (pinned beside playwright-core): the accessibility audit.
const AXE = createRequire(import.meta.url).resolve("axe-core/axe.min.js");

const url = process.env.DIALTONE_URL;
const account = process.env.ACCOUNT;
const startBalance = Number(process.env.START_BALANCE);
const otherPrefix = process.env.OTHER_PREFIX;
const shots = process.env.SCREENSHOT_DIR;
for (const [k, v] of Object.entries({ DIALTONE_URL: url, ACCOUNT: account, OTHER_PREFIX: otherPrefix, SCREENSHOT_DIR: shots })) {
  if (!v) throw new Error(`${k} is not set`);
}
mkdirSync(shots, { recursive: true });

// Playwright's waits are event-driven (an element appears, a text matches);
// this bound only turns a hang into a failure.
const WAIT = { timeout: 15_000 };
let step = "start";
const log = (s) => {
  step = s;
  console.log(`- ${s}`);
};

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-dev-shm-usage"],
});
let page;
// SMS the key sent that were served (and charged): the first, and any sent
// while the filter still had the key's lookup cached after the revocation.
let smsServed = 0;
try {
  const context = await browser.newContext({ viewport: { width: 1100, height: 1400 } });
  await context.grantPermissions(["clipboard-read", "clipboard-write"], { origin: url });
  page = await context.newPage();
  const pageErrors = [];
  page.on("pageerror", (e) => pageErrors.push(String(e)));

  log("a signed-out visit gets the sign-in page, not data");
  let sawData = false;
  page.on("response", (r) => {
    if (r.url().includes("/self/v1/") && r.status() === 200) sawData = true;
  });
  await page.goto(`${url}/dashboard`);
  await page.locator("#signed-out").waitFor({ state: "visible", ...WAIT });
  assert.equal(await page.locator("#signed-in").isVisible(), false);
  assert.equal(sawData, false, "a signed-out page received account data");
  assert.equal(await page.locator("#sign-in-link").getAttribute("href"), "/dev/sign-in");
  await page.screenshot({ path: join(shots, "01-signed-out.png"), fullPage: true });

  log("dev sign-in (keyboard only)");
  await page.locator("#sign-in-link").focus();
  await page.keyboard.press("Enter");
  await page.locator("#dev-account").waitFor(WAIT);
  await page.locator("#dev-account").fill(account);
  await page.locator("#dev-account").press("Enter");
  await page.waitForURL(`${url}/dashboard`, WAIT);
  await page.locator("#signed-in").waitFor({ state: "visible", ...WAIT });
  await page.locator("#whoami").filter({ hasText: account }).waitFor(WAIT);

  log("the balance is shown");
  await page.locator("#balance").filter({ hasText: new RegExp(`^${startBalance}$`) }).waitFor(WAIT);
  // The top-up offer comes from the x402 route's own 402.
  await page.locator("#top-up-price").filter({ hasText: "Top up 100 credits" }).waitFor(WAIT);
  await page.screenshot({ path: join(shots, "02-dashboard.png"), fullPage: true });

  log("accessibility audit (axe-core) of the signed-in page, the signed-out page and the sign-in form");
  // In a context of its own that lets the audit script in: the page's CSP
  // (script-src 'self') refuses injected scripts, as it should.
  const audit = await browser.newContext({ bypassCSP: true });
  await audit.addCookies(await context.cookies());
  for (const [path, ready] of [["/dashboard", "#signed-in"], ["/dev/sign-in", "#dev-sign-in-form"]]) {
    const p = await audit.newPage();
    await p.goto(`${url}${path}`);
    await p.locator(ready).waitFor({ state: "visible", ...WAIT });
    if (path === "/dashboard") await p.locator("#ledger tbody tr").first().waitFor(WAIT);
    await p.addScriptTag({ path: AXE });
    const result = await p.evaluate(() => window.axe.run(document, { resultTypes: ["violations"] }));
    const found = result.violations.map((v) => `${v.id} (${v.impact}): ${v.nodes.map((n) => n.target.join(" ")).join(", ")}`);
    assert.deepEqual(found, [], `accessibility violations on ${path}`);
    await p.close();
  }
  const signedOut = await browser.newContext({ bypassCSP: true });
  const so = await signedOut.newPage();
  await so.goto(`${url}/dashboard`);
  await so.locator("#signed-out").waitFor({ state: "visible", ...WAIT });
  await so.addScriptTag({ path: AXE });
  const soResult = await so.evaluate(() => window.axe.run(document, { resultTypes: ["violations"] }));
  assert.deepEqual(soResult.violations.map((v) => v.id), [], "accessibility violations on the signed-out page");
  await audit.close();
  await signedOut.close();

  log("another account's keys never show");
  assert.equal(await page.locator(`tr[data-prefix="${otherPrefix}"]`).count(), 0);
  assert.ok(!(await page.content()).includes(otherPrefix), "another account's key prefix is on the page");

  log("quick agent key: the secret is shown once");
  await page.getByRole("button", { name: "Quick: Cursor / agent key" }).click();
  await page.locator("#secret-once").waitFor({ state: "visible", ...WAIT });
  const secret = await page.locator("#secret-value").inputValue();
  assert.match(secret, /^dial_live_[0-9a-f]{40}$/);
  assert.match(await page.locator("#secret-once").innerText(), /you will not see it again/);
  await page.locator("#secret-copy").click();
  assert.equal(await page.evaluate(() => navigator.clipboard.readText()), secret);
  await page.screenshot({ path: join(shots, "03-secret-once.png"), fullPage: true });
  const prefix = secret.slice("dial_live_".length, "dial_live_".length + 8);
  const keyRow = page.locator(`#keys tr[data-prefix="${prefix}"]`);
  await keyRow.waitFor(WAIT);
  assert.match(await keyRow.innerText(), /agent key/);
  assert.match(await keyRow.innerText(), /sms:send/);
  assert.equal(await keyRow.getAttribute("data-state"), "active");
  await page.getByRole("button", { name: "I have saved it" }).click();
  assert.equal(await page.locator("#secret-once").isVisible(), false);
  assert.equal(await page.locator("#secret-value").inputValue(), "", "the secret stays in the page after 'saved'");

  log("the key sends an SMS (a curl-equivalent request, outside the page)");
  const send = () =>
    fetch(`${url}/api/v1/sms/send`, {
      method: "POST",
      headers: { authorization: `Bearer ${secret}`, "content-type": "application/json" },
      body: JSON.stringify({ to: "+18148835337", message: "from the dashboard test" }),
    });
  const sent = await send();
  const sentBody = await sent.text();
  assert.equal(sent.status, 200, sentBody);
  assert.equal(JSON.parse(sentBody).success, true);
  smsServed++;

  log("the balance and the ledger move");
  await page.reload();
  await page.locator("#balance").filter({ hasText: new RegExp(`^${startBalance - smsServed}$`) }).waitFor(WAIT);
  const capture = page.locator('#ledger tr[data-kind="capture"]').first();
  await capture.waitFor(WAIT);
  assert.match(await capture.innerText(), /sms_send/);
  assert.match(await capture.innerText(), new RegExp(prefix));
  await page.locator(`#keys tr[data-prefix="${prefix}"] td[data-testid="last_used_at"]`).filter({ hasText: "UTC" }).waitFor(WAIT);
  await page.screenshot({ path: join(shots, "06-after-an-sms.png"), fullPage: true });

  log("revoke it, with a confirmation");
  await page.locator(`#keys tr[data-prefix="${prefix}"] button`).click();
  await page.locator("#confirm-revoke").waitFor({ state: "visible", ...WAIT });
  await page.screenshot({ path: join(shots, "04-confirm-revoke.png"), fullPage: true });
  await page.locator("#confirm-ok").click();
  await page.locator(`#keys tr[data-prefix="${prefix}"][data-state="revoked"]`).waitFor(WAIT);

  log("the next request with it is refused with 401");
  // The filter may reuse the key's lookup for key_cache_ttl_ms (500 ms):
  // send until the refusal, bounded.
  let refused = null;
  for (const deadline = Date.now() + 10_000; Date.now() < deadline; ) {
    const r = await send();
    if (r.status === 401) {
      refused = await r.json();
      break;
    }
    assert.equal(r.status, 200);
    smsServed++;
    await new Promise((ok) => setTimeout(ok, 50));
  }
  assert.ok(refused, "the revoked key was not refused");
  assert.equal(refused.error, "unauthorized");

  log("an API token with 30 days and contacts_read");
  await page.locator("#token-name").fill("CI deploys");
  await page.locator("#token-scopes").getByLabel("contacts_read").check();
  await page.locator("#token-expiry").selectOption("30d");
  await page.getByRole("button", { name: "Create token" }).click();
  await page.locator("#secret-once").waitFor({ state: "visible", ...WAIT });
  const token = await page.locator("#secret-value").inputValue();
  assert.match(token, /^privy_[0-9a-f]{40}$/);
  const tokenPrefix = token.slice("privy_".length, "privy_".length + 8);
  const tokenRow = page.locator(`#tokens tr[data-prefix="${tokenPrefix}"]`);
  await tokenRow.waitFor(WAIT);
  assert.match(await tokenRow.innerText(), /contacts_read/);
  const expires = await tokenRow.locator('td[data-testid="expires_at"]').innerText();
  const in30 = new Date(Date.now() + 30 * 86400_000).toISOString().slice(0, 10);
  const in30b = new Date(Date.now() + 30 * 86400_000 - 60_000).toISOString().slice(0, 10);
  assert.ok(expires.startsWith(in30) || expires.startsWith(in30b), `expiry ${expires}, expected ${in30}`);
  await page.locator("#token-count").filter({ hasText: "1 of 25 active tokens" }).waitFor(WAIT);
  await page.getByRole("button", { name: "I have saved it" }).click();

  log("the 25-token limit");
  // 24 more through the same API the page uses (as the page would, one by one).
  const made = await page.evaluate(async () => {
    let ok = 0;
    for (let i = 0; i < 24; i++) {
      const r = await fetch("/self/v1/keys", {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ kind: "api_token", name: `bulk ${i}`, scopes: ["contacts_read"], expires: "90d" }),
      });
      if (r.status === 201) ok++;
    }
    return ok;
  });
  assert.equal(made, 24);
  await page.reload();
  await page.locator("#token-count").filter({ hasText: "25 of 25 active tokens" }).waitFor(WAIT);
  await page.locator("#token-name").fill("one too many");
  await page.locator("#token-scopes").getByLabel("contacts_read").check();
  await page.getByRole("button", { name: "Create token" }).click();
  await page.locator("#status.error").filter({ hasText: "25 active API tokens" }).waitFor(WAIT);
  assert.equal(await page.locator("#secret-once").isVisible(), false);
  await page.screenshot({ path: join(shots, "05-token-limit.png"), fullPage: true });

  log("the session token: reveal, copy, refresh");
  await page.getByRole("button", { name: "Reveal" }).click();
  const session = await page.locator("#session-token").inputValue();
  assert.match(session, /^eyJ[\w-]+\.[\w-]+\.[\w-]+$/);
  assert.equal(await page.getByRole("button", { name: "Hide" }).getAttribute("aria-expanded"), "true");
  await page.locator("#session-copy").click();
  assert.equal(await page.evaluate(() => navigator.clipboard.readText()), session);
  await page.locator("#session-refresh").click();
  await page.locator("#status").filter({ hasText: "Session token refreshed" }).waitFor(WAIT);
  // The refreshed token works as a Bearer too.
  const viaBearer = await fetch(`${url}/self/v1/me`, { headers: { authorization: `Bearer ${await page.locator("#session-token").inputValue()}` } });
  assert.equal(viaBearer.status, 200);
  assert.equal((await viaBearer.json()).account, account);

  log("sign out: the page shows no data again");
  await page.locator("#sign-out").click();
  await page.locator("#signed-out").waitFor({ state: "visible", ...WAIT });
  await page.reload();
  await page.locator("#signed-out").waitFor({ state: "visible", ...WAIT });

  assert.deepEqual(pageErrors, [], "the page threw");
  console.log(JSON.stringify({ ok: true, revoked_prefix: prefix, token_prefix: tokenPrefix, sms_served: smsServed }));
} catch (e) {
  if (page) await page.screenshot({ path: join(shots, "failure.png"), fullPage: true }).catch(() => {});
  console.error(`FAILED at step "${step}": ${e && e.stack ? e.stack : e}`);
  process.exitCode = 1;
} finally {
  await browser.close();
}
