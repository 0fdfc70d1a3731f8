// dialtone's self-service page: no framework, no build step, no third-party
// script (the page's CSP allows only this file). Every call goes to the same
// origin, through Envoy and the dialtone filter, signed in by the
// `privy-token` cookie (Privy's SDK sets it in production; the local stack's
// dev sign-in sets a dev-minted one).
"use strict";

const $ = (sel) => document.querySelector(sel);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("data-") || k.startsWith("aria-")) node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

function status(message, isError = false) {
  const s = $("#status");
  s.textContent = message;
  s.classList.toggle("error", isError);
}

function when(unix) {
  if (unix === null || unix === undefined) return "—";
  return new Date(unix * 1000).toISOString().slice(0, 16).replace("T", " ") + " UTC";
}

// A same-origin JSON call. Writes carry `content-type: application/json`,
// which is what the service's CSRF check asks of a state-changing request.
async function api(path, { method = "GET", body } = {}) {
  const init = { method, credentials: "same-origin", headers: { accept: "application/json" } };
  if (body !== undefined) {
    init.headers["content-type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const res = await fetch(path, init);
  let json = null;
  try { json = await res.json(); } catch (_) { /* not JSON */ }
  return { status: res.status, ok: res.ok, json: json || {} };
}

function refusal(r) {
  return (r.json && (r.json.message || r.json.error)) || `HTTP ${r.status}`;
}

// ----- the session token (the privy-token cookie) ---------------------------

function sessionToken() {
  const m = document.cookie.split(/;\s*/).find((c) => c.startsWith("privy-token="));
  return m ? decodeURIComponent(m.slice("privy-token=".length)) : null;
}

function tokenExpiry(token) {
  try {
    const payload = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(atob(payload)).exp;
  } catch (_) {
    return null;
  }
}

function showSession() {
  const token = sessionToken();
  $("#session-expiry").textContent = token ? when(tokenExpiry(token)) : "not readable by this page";
  const box = $("#session-token");
  if (!box.hidden) box.value = token || "";
}

// ----- state -----------------------------------------------------------------

let config = { sign_in_url: null, dev_sign_in: false, top_up_path: "/api/v1/credits/top-up" };
let me = null;
let ledgerBefore = null;

async function load() {
  const c = await api("/dashboard/config.json");
  if (c.ok) config = c.json;
  const r = await api("/self/v1/me");
  if (r.status === 401) return signedOut();
  if (!r.ok) return status(`Could not load your account: ${refusal(r)}`, true);
  me = r.json;
  $("#signed-out").hidden = true;
  $("#signed-in").hidden = false;
  $("#sign-out").hidden = !config.dev_sign_in;
  $("#whoami").textContent = `Signed in as ${me.account}`;
  renderScopes();
  await Promise.all([refreshBalance(), loadLedger(true), loadKeys(), topUpPrice()]);
  showSession();
}

function signedOut() {
  me = null;
  $("#signed-in").hidden = true;
  $("#signed-out").hidden = false;
  $("#sign-out").hidden = true;
  $("#whoami").textContent = "Signed out";
  const link = $("#sign-in-link");
  if (config.sign_in_url) link.href = config.sign_in_url;
  else link.replaceWith(el("span", {}, "Ask your operator where to sign in."));
}

function renderScopes() {
  for (const [id, checked] of [["#key-scopes", ["sms:send"]], ["#token-scopes", []]]) {
    const box = $(id);
    box.querySelectorAll("label").forEach((l) => l.remove());
    for (const scope of me.offer.scopes) {
      const input = el("input", { type: "checkbox", name: "scope", value: scope, checked: checked.includes(scope) });
      box.append(el("label", {}, input, scope));
    }
  }
}

async function refreshBalance() {
  const r = await api("/self/v1/me");
  if (r.status === 401) return signedOut();
  if (!r.ok) return;
  me = r.json;
  $("#balance").textContent = me.balance;
  $("#held").textContent = me.held;
}

const LEDGER_KIND = {
  topup: "Top-up", debit: "Charge", hold: "Reserved", capture: "Charged", release: "Released",
  refund: "Refund", expire: "Reservation expired", x402_topup: "Top-up (x402)",
};

async function loadLedger(fresh) {
  if (fresh) {
    ledgerBefore = null;
    $("#ledger tbody").replaceChildren();
  }
  const q = ledgerBefore ? `?limit=20&before=${ledgerBefore}` : "?limit=20";
  const r = await api(`/self/v1/ledger${q}`);
  if (!r.ok) return status(`Could not load the ledger: ${refusal(r)}`, true);
  const body = $("#ledger tbody");
  for (const e of r.json.entries) {
    // What the row did to the credits the account owns (available + held):
    // a hold or a release only moves credits between the two.
    const owned = e.delta_available + e.delta_held;
    const delta = owned > 0 ? `+${owned}` : owned < 0 ? `−${-owned}` : `0 (${e.amount} ${e.kind === "hold" ? "reserved" : "back"})`;
    body.append(el("tr", { "data-kind": e.kind },
      el("td", {}, when(e.created_at)),
      el("td", {}, LEDGER_KIND[e.kind] || e.kind),
      el("td", {}, delta),
      el("td", {}, e.route || "—"),
      el("td", {}, e.key_prefix || "—")));
  }
  if (!body.children.length) body.append(el("tr", {}, el("td", { colSpan: 5 }, "Nothing yet.")));
  ledgerBefore = r.json.next_before;
  $("#ledger-more").hidden = !ledgerBefore;
}

async function topUpPrice() {
  const r = await api(config.top_up_path, { method: "POST", body: {} });
  const offer = r.status === 402 && r.json.accepts && r.json.accepts[0];
  const p = $("#top-up-price");
  if (!offer) {
    p.textContent = "Top-ups are not offered here.";
    return;
  }
  const what = (r.json.resource && r.json.resource.description) || "Top up";
  const name = (offer.extra && offer.extra.name) || "tokens";
  p.textContent = `${what}: ${offer.amount} units of ${name} (${offer.asset}) on ${offer.network}, paid with x402.`;
  $("#top-up-command").textContent =
    `PAYMENT=$(curl -sS -X POST "$DIALTONE_URL${config.top_up_path}" -H "Authorization: Bearer $KEY" -d '{}' | node x402/pay.mjs)\n` +
    `curl -sS -X POST "$DIALTONE_URL${config.top_up_path}" -H "Authorization: Bearer $KEY" -H "PAYMENT-SIGNATURE: $PAYMENT" -d '{}'`;
}

// ----- keys and tokens ---------------------------------------------------------

async function loadKeys() {
  const r = await api("/self/v1/keys");
  if (!r.ok) return status(`Could not load your keys: ${refusal(r)}`, true);
  const keys = r.json.keys;
  renderKeyTable("#keys tbody", keys.filter((k) => k.kind === "api_key"), "last_used_at");
  renderKeyTable("#tokens tbody", keys.filter((k) => k.kind === "api_token"), "expires_at");
  const { active_tokens, max_active_tokens } = r.json.limits;
  $("#token-count").textContent = `${active_tokens} of ${max_active_tokens} active tokens.`;
}

function renderKeyTable(sel, keys, lastColumn) {
  const body = $(sel);
  body.replaceChildren();
  for (const k of keys) {
    const revoke = k.state === "active"
      ? el("button", { type: "button", class: "secondary", "aria-label": `Revoke ${k.name || k.display}` }, "Revoke")
      : "";
    if (revoke) revoke.addEventListener("click", () => confirmRevoke(k));
    body.append(el("tr", { "data-prefix": k.prefix, "data-state": k.state },
      el("td", {}, k.name || "—"),
      el("td", {}, el("code", {}, k.display)),
      el("td", {}, k.scopes.join(", ") || "—"),
      el("td", {}, when(k.created_at)),
      el("td", { "data-testid": lastColumn }, lastColumn === "expires_at" && k.expires_at === null ? "never" : when(k[lastColumn])),
      el("td", { class: `state-${k.state}` }, k.state),
      el("td", {}, revoke)));
  }
  if (!keys.length) body.append(el("tr", {}, el("td", { colSpan: 7 }, "None yet.")));
}

function checkedScopes(fieldset) {
  return [...$(fieldset).querySelectorAll("input:checked")].map((i) => i.value);
}

async function createKey(body) {
  const r = await api("/self/v1/keys", { method: "POST", body });
  if (r.status !== 201) {
    status(refusal(r), true);
    return false;
  }
  $("#secret-kind").textContent = r.json.kind === "api_token" ? "API token" : "API key";
  $("#secret-value").value = r.json.secret;
  const panel = $("#secret-once");
  panel.hidden = false;
  panel.focus();
  status(`Created ${r.json.kind === "api_token" ? "token" : "key"} ${r.json.prefix}.`);
  await Promise.all([loadKeys(), refreshBalance()]);
  return true;
}

function confirmRevoke(k) {
  const dialog = $("#confirm-revoke");
  $("#confirm-what").textContent = `${k.name || "this key"} (${k.display})`;
  dialog.returnValue = "";
  dialog.onclose = async () => {
    if (dialog.returnValue !== "revoke") return;
    const r = await api(`/self/v1/keys/${k.prefix}/revoke`, { method: "POST", body: {} });
    if (!r.ok) return status(refusal(r), true);
    status(`Revoked ${k.display}. Requests with it are refused from now on.`);
    await loadKeys();
  };
  dialog.showModal();
  $("#confirm-cancel").focus();
}

async function copy(text, what) {
  try {
    await navigator.clipboard.writeText(text);
    status(`${what} copied.`);
  } catch (_) {
    status(`Select the ${what.toLowerCase()} and copy it (the browser refused clipboard access).`, true);
  }
}

async function refreshSession() {
  if (!config.dev_sign_in) {
    status("Your session is refreshed by Privy when you sign in again.");
    return;
  }
  const r = await api("/dev/sign-in", { method: "POST", body: { account: me.account } });
  if (!r.ok) return status(refusal(r), true);
  showSession();
  status("Session token refreshed.");
}

// ----- wiring ------------------------------------------------------------------

function dashboard() {
  $("#quick-agent-key").addEventListener("click", () => createKey({ preset: "agent" }));
  $("#key-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const name = $("#key-name").value;
    if (await createKey({ name, scopes: checkedScopes("#key-scopes") })) ev.target.reset(), renderScopes();
  });
  $("#token-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const body = { kind: "api_token", name: $("#token-name").value, scopes: checkedScopes("#token-scopes"), expires: $("#token-expiry").value };
    if (await createKey(body)) ev.target.reset(), renderScopes();
  });
  $("#secret-copy").addEventListener("click", () => copy($("#secret-value").value, "Secret"));
  $("#secret-done").addEventListener("click", () => {
    $("#secret-value").value = "";
    $("#secret-once").hidden = true;
  });
  $("#ledger-more").addEventListener("click", () => loadLedger(false));
  $("#session-reveal").addEventListener("click", (ev) => {
    const box = $("#session-token");
    box.hidden = !box.hidden;
    ev.target.setAttribute("aria-expanded", String(!box.hidden));
    ev.target.textContent = box.hidden ? "Reveal" : "Hide";
    showSession();
  });
  $("#session-copy").addEventListener("click", () => copy(sessionToken() || "", "Session token"));
  $("#session-refresh").addEventListener("click", refreshSession);
  $("#sign-out").addEventListener("click", async () => {
    await api("/dev/sign-out", { method: "POST", body: {} });
    signedOut();
  });
  load().catch((e) => status(`Could not load the page: ${e}`, true));
}

function devSignIn() {
  $("#dev-sign-in-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const r = await api("/dev/sign-in", { method: "POST", body: { account: $("#dev-account").value } });
    if (!r.ok) return status(refusal(r), true);
    window.location.assign("/dashboard");
  });
}

document.addEventListener("DOMContentLoaded", () => {
  if (document.body.dataset.page === "dev-sign-in") devSignIn();
  else dashboard();
});
