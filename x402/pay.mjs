// Signs an x402 payment with the reference client (npm @x402/core's x402Client + x402HTTPClient,
// @x402/evm's exact EVM scheme, as the wire samples in shared/testdata/x402 were made) and
// prints the PAYMENT-SIGNATURE header value (standard base64 of the PaymentPayload JSON).
//
//   X402_PAYER_KEY=0x… node x402/pay.mjs [PAYMENT_REQUIRED] [options]
//
// PAYMENT_REQUIRED (argument, or stdin when absent or "-"): the base64 `PAYMENT-REQUIRED`
// header value of a 402, or its JSON body (an object with `x402Version` and `accepts`, other
// fields ignored). The key: $X402_PAYER_KEY, or the env variable named by --key-env.
// Options:
//   --accept N           sign accepts[N] (default: the client's choice, the first it supports)
//   --valid-before UNIX  sign as if at UNIX - maxTimeoutSeconds, so the authorization's
//                        validBefore is UNIX (e.g. in the past, for an expired payment); the
//                        reference client computes validBefore = now + maxTimeoutSeconds itself
//   --json               print {"header", "paymentPayload", "paymentRequirements"} instead
//   --key-env NAME       read the private key from $NAME
import { readFileSync } from "node:fs";
import { x402Client, x402HTTPClient } from "@x402/core/client";
import { registerExactEvmScheme } from "@x402/evm/exact/client";
import { privateKeyToAccount } from "viem/accounts";
import { option, positional, toJson } from "./lib.mjs";

const argv = process.argv.slice(2);
const fail = (msg) => {
  console.error(`pay: ${msg}`);
  process.exit(2);
};

const keyEnv = option(argv, "--key-env") ?? "X402_PAYER_KEY";
const key = process.env[keyEnv];
if (!key) fail(`set ${keyEnv} to the payer's private key (0x + 64 hex)`);
const acceptIndex = option(argv, "--accept");
const validBefore = option(argv, "--valid-before");
if (validBefore !== undefined && !/^\d+$/.test(validBefore)) fail("--valid-before takes a unix time in seconds");

const [arg] = positional(argv, ["--accept", "--valid-before", "--key-env"]);
const input = (arg === undefined || arg === "-" ? readFileSync(0, "utf8") : arg).trim();
if (!input) fail("no PaymentRequired given (argument or stdin)");

let paymentRequired;
try {
  const http = new x402HTTPClient(new x402Client());
  if (input.startsWith("{")) {
    const body = JSON.parse(input);
    // The reference HTTP client takes a v2 PaymentRequired from the header only (a v1 one from
    // the body); a v2 402 body with the same fields is the same object.
    paymentRequired = body.x402Version === 1 ? http.getPaymentRequiredResponse(() => null, body) : body;
  } else {
    paymentRequired = http.getPaymentRequiredResponse((name) => (name.toUpperCase() === "PAYMENT-REQUIRED" ? input : null));
  }
} catch (e) {
  fail(`cannot read PaymentRequired: ${e.message}`);
}
if (!Array.isArray(paymentRequired?.accepts) || paymentRequired.accepts.length === 0) fail("PaymentRequired has no accepts");

// The requirement the client picks (among those its registered schemes support).
const realNow = Date.now;
function select(_version, supported) {
  let chosen = supported[0];
  if (acceptIndex !== undefined) {
    chosen = paymentRequired.accepts[Number(acceptIndex)];
    if (!chosen || !supported.includes(chosen)) fail(`accepts[${acceptIndex}] is missing or not an EVM exact requirement`);
  }
  if (validBefore !== undefined) {
    const at = (Number(validBefore) - Number(chosen.maxTimeoutSeconds)) * 1000;
    Date.now = () => at; // restored right after signing
  }
  return chosen;
}

const client = new x402Client(select);
// The reference client refuses, by default, assets it does not know (its table of default
// assets per network) and more than $1 a payment: this signs for test wallets on a local chain,
// where the test decides what is paid, so those spend controls are off.
client.setSpendControls(false);
registerExactEvmScheme(client, { signer: privateKeyToAccount(key) });
const httpClient = new x402HTTPClient(client);

let paymentPayload;
try {
  paymentPayload = await httpClient.createPaymentPayload(paymentRequired);
} catch (e) {
  fail(e.message);
} finally {
  Date.now = realNow;
}
const header = httpClient.encodePaymentSignatureHeader(paymentPayload)["PAYMENT-SIGNATURE"];
if (argv.includes("--json")) {
  console.log(toJson({ header, paymentPayload, paymentRequirements: paymentPayload.accepted }, 2));
} else {
  console.log(header);
}
