// Prepares a fresh local anvil for x402 and describes the stack; called by
// scripts/x402-stack.sh start (not meant to be run by hand, but harmless on a fresh anvil):
//   1. waits for anvil's RPC (bounded),
//   2. puts the canonical Multicall3 runtime at 0xcA11bde05977b3631167028862bE2a173976CA11
//      (anvil_setCode; the facilitator diagnoses failed simulations through it) and checks its
//      code hash,
//   3. compiles (cached) and deploys TestUSDC from anvil account 0 as that account's first
//      transaction, so at 0x5FbDB2315678afecb367f032d93F642f64180aa3,
//   4. mints X402_PAYER_FUNDS (default 1,000 USDC = 1_000_000_000 units) to the payer,
//   5. waits for the facilitator's GET /supported (bounded),
//   6. writes DIR/x402.json and DIR/x402.env.
// Inputs (env): X402_DIR, X402_ANVIL_PORT, X402_FACILITATOR_PORT, X402_ANVIL_PID,
// X402_FACILITATOR_PID, optional X402_PAYER_FUNDS, X402_WAIT_SECONDS (default 60).
import { readFileSync, writeFileSync, renameSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { createPublicClient, createWalletClient, http, keccak256, getAddress } from "viem";
import { privateKeyToAccount } from "viem/accounts";
import { compileTestUSDC } from "./compile.mjs";
import {
  CHAIN_ID, NETWORK, TOKEN, TOKEN_ADDRESS, MULTICALL3_ADDRESS, ROLES, devAccount, localChain, tokenAbi,
} from "./lib.mjs";

const here = dirname(fileURLToPath(import.meta.url));
// keccak256 of Multicall3's runtime code as deployed at 0xcA11… on Ethereum mainnet (and
// every other chain that has it); contracts/Multicall3.runtime.hex must hash to it.
const MULTICALL3_CODEHASH = "0xd5c15df687b16f2ff992fc8d767b4216323184a2bbc6ee2f9c398c318e770891";

const env = process.env;
const dir = resolve(env.X402_DIR ?? die("X402_DIR is required"));
const anvilPort = Number(env.X402_ANVIL_PORT ?? 8545);
const facilitatorPort = Number(env.X402_FACILITATOR_PORT ?? 4022);
const payerFunds = BigInt(env.X402_PAYER_FUNDS ?? "1000000000");
const waitMs = Number(env.X402_WAIT_SECONDS ?? 60) * 1000;
const rpcUrl = `http://127.0.0.1:${anvilPort}`;
const facilitatorUrl = `http://127.0.0.1:${facilitatorPort}`;

function die(msg) {
  console.error(`x402 setup: ${msg}`);
  process.exit(1);
}

function alive(pid) {
  if (!pid) return true;
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

async function until(what, probe) {
  const deadline = Date.now() + waitMs;
  let last;
  while (Date.now() < deadline) {
    for (const [name, pid] of [["anvil", env.X402_ANVIL_PID], ["facilitator", env.X402_FACILITATOR_PID]]) {
      if (!alive(Number(pid))) die(`${name} (pid ${pid}) exited; see ${join(dir, `${name}.log`)}`);
    }
    try {
      if (await probe()) return;
    } catch (e) {
      last = e;
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  die(`${what} did not answer within ${waitMs / 1000} s${last ? ` (${last.message.split("\n")[0]})` : ""}`);
}

const t0 = Date.now();
const chain = localChain(rpcUrl);
const transport = http(rpcUrl, { retryCount: 0 });
const publicClient = createPublicClient({ chain, transport, pollingInterval: 100 });

await until(`anvil at ${rpcUrl}`, async () => (await publicClient.getChainId()) === CHAIN_ID);

// Multicall3 ------------------------------------------------------------------------------------
const multicall3Code = readFileSync(join(here, "contracts", "Multicall3.runtime.hex"), "utf8").trim();
if (keccak256(multicall3Code) !== MULTICALL3_CODEHASH) die("contracts/Multicall3.runtime.hex is not the canonical Multicall3");
await publicClient.request({ method: "anvil_setCode", params: [MULTICALL3_ADDRESS, multicall3Code] });
if (keccak256(await publicClient.getCode({ address: MULTICALL3_ADDRESS })) !== MULTICALL3_CODEHASH) {
  die("anvil_setCode did not install Multicall3");
}

// TestUSDC --------------------------------------------------------------------------------------
const artifact = compileTestUSDC();
const deployer = devAccount(ROLES.deployer);
const payer = devAccount(ROLES.payer);
const payTo = devAccount(ROLES.payTo);
const unfunded = devAccount(ROLES.unfunded);
const facilitator = devAccount(ROLES.facilitator);
const wallet = createWalletClient({ chain, transport, account: privateKeyToAccount(deployer.privateKey), pollingInterval: 100 });

if ((await publicClient.getTransactionCount({ address: deployer.address })) !== 0) {
  die(`anvil account 0 has sent transactions already: is ${rpcUrl} a fresh anvil?`);
}
const deployHash = await wallet.deployContract({ abi: artifact.abi, bytecode: artifact.bytecode });
const deployed = await publicClient.waitForTransactionReceipt({ hash: deployHash });
if (deployed.status !== "success" || getAddress(deployed.contractAddress) !== TOKEN_ADDRESS) {
  die(`TestUSDC deployment: status ${deployed.status}, address ${deployed.contractAddress} (want ${TOKEN_ADDRESS})`);
}
const mintHash = await wallet.writeContract({ address: TOKEN_ADDRESS, abi: tokenAbi, functionName: "mint", args: [payer.address, payerFunds] });
if ((await publicClient.waitForTransactionReceipt({ hash: mintHash })).status !== "success") die("mint failed");
const balance = await publicClient.readContract({ address: TOKEN_ADDRESS, abi: tokenAbi, functionName: "balanceOf", args: [payer.address] });
if (balance !== payerFunds) die(`payer balance ${balance}, want ${payerFunds}`);

// facilitator -----------------------------------------------------------------------------------
let supported;
await until(`facilitator at ${facilitatorUrl}`, async () => {
  const r = await fetch(`${facilitatorUrl}/supported`);
  if (!r.ok) return false;
  supported = await r.json();
  return true;
});
if (!supported.kinds?.some((k) => k.x402Version === 2 && k.scheme === "exact" && k.network === NETWORK)) {
  die(`facilitator does not support exact on ${NETWORK}: ${JSON.stringify(supported)}`);
}

// describe the stack ----------------------------------------------------------------------------
const stack = {
  rpcUrl,
  anvilPort,
  chainId: CHAIN_ID,
  network: NETWORK,
  asset: TOKEN_ADDRESS,
  token: { ...TOKEN, address: TOKEN_ADDRESS, compiler: artifact.compiler },
  multicall3: MULTICALL3_ADDRESS,
  payer: { address: payer.address, privateKey: payer.privateKey, balance: payerFunds.toString() },
  payTo: { address: payTo.address },
  unfunded: { address: unfunded.address, privateKey: unfunded.privateKey },
  minter: { address: deployer.address, privateKey: deployer.privateKey },
  facilitator: { url: facilitatorUrl, port: facilitatorPort, address: facilitator.address },
  pids: { anvil: Number(env.X402_ANVIL_PID) || null, facilitator: Number(env.X402_FACILITATOR_PID) || null },
  logs: { anvil: join(dir, "anvil.log"), facilitator: join(dir, "facilitator.log") },
  note: "anvil's well-known dev accounts: these keys are public test keys, never use them elsewhere",
};
const envLines = {
  X402_DIR: dir,
  X402_RPC_URL: rpcUrl,
  X402_ANVIL_PORT: anvilPort,
  X402_CHAIN_ID: CHAIN_ID,
  X402_NETWORK: NETWORK,
  X402_ASSET: TOKEN_ADDRESS,
  X402_TOKEN_NAME: TOKEN.name,
  X402_TOKEN_VERSION: TOKEN.version,
  X402_TOKEN_DECIMALS: TOKEN.decimals,
  X402_PAYER_ADDRESS: payer.address,
  X402_PAYER_KEY: payer.privateKey,
  X402_PAYER_BALANCE: payerFunds,
  X402_PAYTO_ADDRESS: payTo.address,
  X402_UNFUNDED_ADDRESS: unfunded.address,
  X402_UNFUNDED_KEY: unfunded.privateKey,
  X402_MINTER_KEY: deployer.privateKey,
  X402_FACILITATOR_URL: facilitatorUrl,
  X402_FACILITATOR_PORT: facilitatorPort,
  X402_FACILITATOR_ADDRESS: facilitator.address,
  X402_ANVIL_PID: stack.pids.anvil ?? "",
  X402_FACILITATOR_PID: stack.pids.facilitator ?? "",
};
const write = (name, text) => {
  writeFileSync(join(dir, `${name}.tmp`), text);
  renameSync(join(dir, `${name}.tmp`), join(dir, name));
};
write("x402.json", `${JSON.stringify(stack, null, 2)}\n`);
write("x402.env", Object.entries(envLines).map(([k, v]) => `${k}=${v}`).join("\n") + "\n");
console.log(`x402 setup: token ${TOKEN_ADDRESS}, payer ${payer.address} funded with ${payerFunds} units, facilitator ${facilitatorUrl} (${Date.now() - t0} ms)`);
