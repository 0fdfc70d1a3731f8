// End-to-end smoke test of a started x402 stack (scripts/x402-stack.sh start DIR):
//   node x402/smoke.mjs --stack DIR        (or X402_STACK=DIR node x402/smoke.mjs)
// Signs with x402/pay.mjs (the reference client), asks the facilitator (the reference
// facilitator) to verify and settle, and checks the chain: one good payment moves exactly
// 10000 units from the payer to payTo, once; a replay, an expired authorization, a wrong amount,
// a wrong payTo and an unfunded payer are refused with the reference library's reasons.
// Prints one line per check and "N passed, M failed"; exits 1 on any failure.
import { execFileSync } from "node:child_process";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { createPublicClient, http } from "viem";
import { encodePaymentRequiredHeader } from "@x402/core/http";
import { loadStack, localChain } from "./lib.mjs";

const here = dirname(fileURLToPath(import.meta.url));
const stack = loadStack();
if (!stack) {
  console.error("usage: node x402/smoke.mjs --stack DIR   (DIR as given to scripts/x402-stack.sh start)");
  process.exit(2);
}
const t0 = Date.now();
const AMOUNT = 10000n;
const facilitatorUrl = stack.facilitator.url;
const chainClient = createPublicClient({ chain: localChain(stack.rpcUrl), transport: http(stack.rpcUrl) });

let passed = 0;
let failed = 0;
function check(name, ok, detail = "") {
  if (ok) passed++;
  else failed++;
  console.log(`${ok ? "ok  " : "FAIL"} ${name}${detail ? ` — ${detail}` : ""}`);
}

function node(script, args, { input, env } = {}) {
  return execFileSync(process.execPath, [join(here, script), ...args], {
    input,
    env: { ...process.env, ...env },
    encoding: "utf8",
    stdio: ["pipe", "pipe", "inherit"],
  }).trim();
}

function pay(paymentRequired, { key = stack.payer.privateKey, validBefore, asHeader = false } = {}) {
  const args = ["--json"];
  if (validBefore !== undefined) args.push("--valid-before", String(validBefore));
  const input = asHeader ? encodePaymentRequiredHeader(paymentRequired) : JSON.stringify(paymentRequired);
  return JSON.parse(node("pay.mjs", args, { input, env: { X402_PAYER_KEY: key } }));
}

async function post(path, paymentPayload, paymentRequirements) {
  const started = Date.now();
  const r = await fetch(`${facilitatorUrl}${path}`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ x402Version: paymentPayload?.x402Version ?? 2, paymentPayload, paymentRequirements }),
  });
  return { status: r.status, body: await r.json(), ms: Date.now() - started };
}

function balances() {
  const rows = JSON.parse(node("balance.mjs", [stack.payer.address, stack.payTo.address, stack.unfunded.address, "--rpc", stack.rpcUrl, "--token", stack.asset]));
  return { payer: BigInt(rows[0].balance), payTo: BigInt(rows[1].balance), unfunded: BigInt(rows[2].balance) };
}

const requirements = (over = {}) => ({
  scheme: "exact",
  network: stack.network,
  amount: AMOUNT.toString(),
  asset: stack.asset,
  payTo: stack.payTo.address,
  maxTimeoutSeconds: 60,
  extra: { name: stack.token.name, version: stack.token.version },
  ...over,
});
const paymentRequired = (req = requirements()) => ({
  x402Version: 2,
  error: "PAYMENT-SIGNATURE header is required",
  resource: { url: "http://127.0.0.1:10000/api/premium", description: "dialtone x402 smoke", mimeType: "application/json" },
  accepts: [req],
});
const reasonIs = (res, field, want) => res.status === 200 && res.body[field] === want;
const show = (res) => `${res.status} ${JSON.stringify(res.body).slice(0, 160)} (${res.ms} ms)`;

// 0. the facilitator supports exact on this network, with the facilitator wallet as signer
const supported = await (await fetch(`${facilitatorUrl}/supported`)).json();
check(
  "GET /supported lists exact v2 on " + stack.network,
  supported.kinds?.some((k) => k.x402Version === 2 && k.scheme === "exact" && k.network === stack.network) &&
    Object.values(supported.signers ?? {}).flat().includes(stack.facilitator.address),
  JSON.stringify(supported.signers),
);

const before = balances();

// 1. a good payment: sign (from the PAYMENT-REQUIRED header), verify, settle
const good = pay(paymentRequired(), { asHeader: true });
check("pay.mjs signs a PaymentPayload", good.header && good.paymentPayload.payload.authorization.value === AMOUNT.toString() &&
  Buffer.from(good.header, "base64").toString("utf8") === JSON.stringify(good.paymentPayload));
const req = requirements();
const v1 = await post("/verify", good.paymentPayload, req);
check("verify: valid payment", v1.status === 200 && v1.body.isValid === true && v1.body.payer === stack.payer.address, show(v1));
const s1 = await post("/settle", good.paymentPayload, req);
const settledTx = s1.body.transaction;
check("settle: success with a transaction hash", s1.status === 200 && s1.body.success === true && /^0x[0-9a-f]{64}$/.test(settledTx ?? "") &&
  s1.body.network === stack.network && s1.body.payer === stack.payer.address, show(s1));
if (/^0x[0-9a-f]{64}$/.test(settledTx ?? "")) {
  const receipt = await chainClient.getTransactionReceipt({ hash: settledTx });
  check("settle: the transaction is mined and succeeded", receipt.status === "success" && receipt.from.toLowerCase() === stack.facilitator.address.toLowerCase(),
    `block ${receipt.blockNumber}, from ${receipt.from}`);
}
const mid = balances();
check("balances: payer -10000, payTo +10000", mid.payer === before.payer - AMOUNT && mid.payTo === before.payTo + AMOUNT,
  `payer ${before.payer} -> ${mid.payer}, payTo ${before.payTo} -> ${mid.payTo}`);

// 2. replay of the same payload
const v2 = await post("/verify", good.paymentPayload, req);
check("replay: verify refuses (nonce used)", reasonIs(v2, "invalidReason", "invalid_exact_evm_nonce_already_used") && v2.body.isValid === false, show(v2));
const s2 = await post("/settle", good.paymentPayload, req);
check("replay: settle refuses (nonce used)", reasonIs(s2, "errorReason", "invalid_exact_evm_nonce_already_used") && s2.body.success === false, show(s2));

// 3. expired authorization (validBefore in the past)
const expired = pay(paymentRequired(), { validBefore: Math.floor(Date.now() / 1000) - 60 });
const v3 = await post("/verify", expired.paymentPayload, req);
check("expired: verify refuses (valid_before)", reasonIs(v3, "invalidReason", "invalid_exact_evm_payload_authorization_valid_before"), show(v3));

// 4. wrong amount: signed for 10000, the server asks 20000
const fresh = pay(paymentRequired());
const v4 = await post("/verify", fresh.paymentPayload, requirements({ amount: "20000" }));
check("wrong amount: verify refuses (value mismatch)", reasonIs(v4, "invalidReason", "invalid_exact_evm_payload_authorization_value_mismatch"), show(v4));
const s4 = await post("/settle", fresh.paymentPayload, requirements({ amount: "20000" }));
check("wrong amount: settle refuses, nothing sent", reasonIs(s4, "errorReason", "invalid_exact_evm_payload_authorization_value_mismatch") && s4.body.transaction === "", show(s4));

// 5. wrong payTo
const v5 = await post("/verify", fresh.paymentPayload, requirements({ payTo: stack.unfunded.address }));
check("wrong payTo: verify refuses (recipient mismatch)", reasonIs(v5, "invalidReason", "invalid_exact_evm_recipient_mismatch"), show(v5));

// 6. unfunded payer (holds less than the amount: 0 on a freshly started stack)
if (before.unfunded >= AMOUNT) check("unfunded payer holds less than the amount (restart the stack)", false, `it holds ${before.unfunded}`);
const broke = pay(paymentRequired(), { key: stack.unfunded.privateKey });
const v6 = await post("/verify", broke.paymentPayload, req);
check("unfunded payer: verify refuses (insufficient balance)", reasonIs(v6, "invalidReason", "invalid_exact_evm_insufficient_balance") &&
  v6.body.payer === stack.unfunded.address, show(v6));

// 7. malformed requests, answered as the reference facilitator's HTTP API does
const v7 = await post("/verify", fresh.paymentPayload, undefined);
check("missing paymentRequirements: 400", v7.status === 400 && v7.body.error === "Missing paymentPayload or paymentRequirements", show(v7));
const v8 = await post("/verify", fresh.paymentPayload, requirements({ network: "eip155:84532" }));
check("unregistered network: 500 with the library's error", v8.status === 500 && /No facilitator registered/.test(v8.body.error ?? ""), show(v8));

// 8. nothing else moved: exactly one transfer of 10000
const after = balances();
check("balances: exactly one payment moved, nothing from the unfunded payer", after.payer === before.payer - AMOUNT &&
  after.payTo === before.payTo + AMOUNT && after.unfunded === before.unfunded, `payer ${after.payer}, payTo ${after.payTo}, unfunded ${after.unfunded}`);

console.log(`x402 smoke: ${Date.now() - t0} ms`);
console.log(`${passed} passed, ${failed} failed`);
process.exit(failed === 0 ? 0 : 1);
