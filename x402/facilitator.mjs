// An x402 v2 facilitator for the local anvil: the reference library (npm @x402/core's
// x402Facilitator + @x402/evm's exact EVM scheme) behind plain node:http, with the HTTP API of
// the reference facilitator example (x402 repo, examples/typescript/facilitator/basic):
//   POST /verify    {x402Version, paymentPayload, paymentRequirements} -> VerifyResponse (200)
//   POST /settle    same body                                           -> SettleResponse (200)
//   GET  /supported                                                     -> {kinds, extensions, signers}
//   missing paymentPayload/paymentRequirements -> 400 {"error": "Missing paymentPayload or paymentRequirements"}
//   anything the library throws (e.g. unregistered network) -> 500 {"error": message}
// No payment logic of its own. One log line per request, without keys or signatures.
//
//   node x402/facilitator.mjs [--port N] [--rpc URL] [--host H]
// env: X402_FACILITATOR_PORT (4022), X402_RPC_URL (http://127.0.0.1:8545),
//      X402_FACILITATOR_HOST (127.0.0.1), X402_FACILITATOR_KEY (default: anvil account 9),
//      X402_NETWORK (eip155:31337)
import { createServer } from "node:http";
import { x402Facilitator } from "@x402/core/facilitator";
import { toFacilitatorEvmSigner } from "@x402/evm";
import { registerExactEvmScheme } from "@x402/evm/exact/facilitator";
import { createWalletClient, http, publicActions, nonceManager } from "viem";
import { privateKeyToAccount } from "viem/accounts";
import { NETWORK, ROLES, devAccount, localChain, option, toJson } from "./lib.mjs";

const argv = process.argv;
const port = Number(option(argv, "--port") ?? process.env.X402_FACILITATOR_PORT ?? 4022);
const host = option(argv, "--host") ?? process.env.X402_FACILITATOR_HOST ?? "127.0.0.1";
const rpcUrl = option(argv, "--rpc") ?? process.env.X402_RPC_URL ?? "http://127.0.0.1:8545";
const network = process.env.X402_NETWORK ?? NETWORK;
const key = process.env.X402_FACILITATOR_KEY ?? devAccount(ROLES.facilitator).privateKey;

// The facilitator's wallet (pays gas for settlements). nonceManager: concurrent settles get
// consecutive nonces instead of racing on eth_getTransactionCount.
const account = privateKeyToAccount(key, { nonceManager });
const client = createWalletClient({
  account,
  chain: localChain(rpcUrl),
  transport: http(rpcUrl),
  pollingInterval: 100, // anvil mines each transaction at once: don't wait viem's default 4 s
}).extend(publicActions);

const signer = toFacilitatorEvmSigner({
  address: account.address,
  getCode: (args) => client.getCode(args),
  readContract: (args) => client.readContract({ ...args, args: args.args || [] }),
  verifyTypedData: (args) => client.verifyTypedData(args),
  writeContract: (args) => client.writeContract({ ...args, args: args.args || [] }),
  sendTransaction: (args) => client.sendTransaction(args),
  waitForTransactionReceipt: (args) => client.waitForTransactionReceipt(args),
});

const facilitator = new x402Facilitator();
registerExactEvmScheme(facilitator, { signer, networks: network });

const MAX_BODY = 1 << 20;

function readBody(req) {
  return new Promise((resolveBody, reject) => {
    const chunks = [];
    let size = 0;
    req.on("data", (c) => {
      size += c.length;
      if (size > MAX_BODY) {
        reject(Object.assign(new Error("Request body too large"), { status: 413 }));
        req.destroy();
      } else chunks.push(c);
    });
    req.on("end", () => resolveBody(Buffer.concat(chunks).toString("utf8")));
    req.on("error", reject);
  });
}

function summary(path, body, result) {
  const auth = body?.paymentPayload?.payload?.authorization;
  const req = body?.paymentRequirements;
  const parts = [];
  if (req) parts.push(`network=${req.network} amount=${req.amount}`);
  if (auth?.from) parts.push(`from=${auth.from}`);
  if (result && path === "/verify") parts.push(`isValid=${result.isValid}${result.invalidReason ? ` reason=${result.invalidReason}` : ""}`);
  if (result && path === "/settle") {
    parts.push(`success=${result.success}${result.errorReason ? ` reason=${result.errorReason}` : ""}`);
    if (result.transaction) parts.push(`tx=${result.transaction}`);
  }
  return parts.join(" ");
}

async function handle(req) {
  const path = new URL(req.url, "http://x").pathname;
  if (req.method === "GET" && path === "/supported") return { status: 200, body: facilitator.getSupported() };
  if (req.method === "POST" && (path === "/verify" || path === "/settle")) {
    let body;
    try {
      const text = await readBody(req);
      body = text.trim() === "" ? {} : JSON.parse(text);
    } catch (e) {
      return { status: e.status ?? 400, body: { error: e.status ? e.message : "Invalid JSON body" } };
    }
    const { paymentPayload, paymentRequirements } = body ?? {};
    if (!paymentPayload || !paymentRequirements) {
      return { status: 400, body: { error: "Missing paymentPayload or paymentRequirements" }, body0: body };
    }
    try {
      const result = path === "/verify"
        ? await facilitator.verify(paymentPayload, paymentRequirements)
        : await facilitator.settle(paymentPayload, paymentRequirements);
      return { status: 200, body: result, body0: body };
    } catch (error) {
      return { status: 500, body: { error: error instanceof Error ? error.message : "Unknown error" }, body0: body };
    }
  }
  return { status: 404, body: { error: `Not found: ${req.method} ${path}` } };
}

const server = createServer(async (req, res) => {
  const started = process.hrtime.bigint();
  let out;
  try {
    out = await handle(req);
  } catch (error) {
    out = { status: 500, body: { error: error instanceof Error ? error.message : "Unknown error" } };
  }
  const payload = toJson(out.body);
  res.writeHead(out.status, { "content-type": "application/json; charset=utf-8", "content-length": Buffer.byteLength(payload) });
  res.end(payload);
  const ms = Number(process.hrtime.bigint() - started) / 1e6;
  const path = new URL(req.url, "http://x").pathname;
  const detail = out.status === 200 ? summary(path, out.body0, out.body) : `error=${JSON.stringify(out.body.error ?? "").slice(0, 200)}`;
  console.log(`${new Date().toISOString()} ${req.method} ${path} ${out.status} ${ms.toFixed(1)}ms ${detail}`.trimEnd());
});

server.keepAliveTimeout = 65_000;
server.listen(port, host, () => {
  console.log(`${new Date().toISOString()} x402 facilitator listening on http://${host}:${server.address().port} (network ${network}, rpc ${rpcUrl}, signer ${account.address})`);
});

function shutdown(signal) {
  console.log(`${new Date().toISOString()} ${signal}: closing`);
  server.close(() => process.exit(0));
  server.closeIdleConnections?.();
  setTimeout(() => process.exit(0), 2000).unref();
}
process.on("SIGTERM", () => shutdown("SIGTERM"));
process.on("SIGINT", () => shutdown("SIGINT"));
