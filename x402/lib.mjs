// Shared bits of dialtone's local x402 stack: anvil's well-known dev accounts, the roles they
// play, the stack description (DIR/x402.json) and a viem chain for the local anvil.
// No x402 logic lives here: signing, verifying and settling are the reference library's.
import { readFileSync, existsSync, statSync } from "node:fs";
import { join } from "node:path";
import { mnemonicToAccount } from "viem/accounts";
import { anvil } from "viem/chains";
import { defineChain, toHex } from "viem";

/** anvil's default mnemonic: its accounts are public test keys, never secrets. */
export const ANVIL_MNEMONIC = "test test test test test test test test test test test junk";

/** Which anvil account plays which part (same as the wire samples in shared/testdata/x402). */
export const ROLES = Object.freeze({
  deployer: 0, // deploys TestUSDC (first tx of account 0 -> 0x5FbDB2315678afecb367f032d93F642f64180aa3) and mints
  payer: 1, // 0x70997970C51812dc3A010C7d01b50e0d17dc79C8, funded with 1,000 USDC
  payTo: 2, // 0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC, the resource server's payTo
  unfunded: 3, // 0x90F79bf6EB2c4f870365E785982E1f101E93b906, holds no USDC
  facilitator: 9, // 0xa0Ee7A142d267C1f36714E4a8F75612F20a79720, sends settle transactions (pays gas)
});

export const CHAIN_ID = 31337;
export const NETWORK = `eip155:${CHAIN_ID}`;
export const TOKEN_ADDRESS = "0x5FbDB2315678afecb367f032d93F642f64180aa3";
export const MULTICALL3_ADDRESS = "0xcA11bde05977b3631167028862bE2a173976CA11";
export const TOKEN = Object.freeze({ name: "USDC", version: "2", decimals: 6 });

/** anvil dev account `index`: { index, address, privateKey }. */
export function devAccount(index) {
  const account = mnemonicToAccount(ANVIL_MNEMONIC, { addressIndex: index });
  return { index, address: account.address, privateKey: toHex(account.getHdKey().privateKey) };
}

/** A viem chain for the local anvil at `rpcUrl`. */
export function localChain(rpcUrl) {
  return defineChain({ ...anvil, rpcUrls: { default: { http: [rpcUrl] } } });
}

/**
 * The stack description written by `scripts/x402-stack.sh start DIR` (DIR/x402.json).
 * Found from `--stack DIR|FILE` in argv, else $X402_STACK (DIR or file); null if neither.
 */
export function loadStack(argv = process.argv) {
  const i = argv.indexOf("--stack");
  const where = i >= 0 ? argv[i + 1] : process.env.X402_STACK;
  if (!where) return null;
  const file = existsSync(where) && statSync(where).isDirectory() ? join(where, "x402.json") : where;
  return JSON.parse(readFileSync(file, "utf8"));
}

/** `--name value` from argv, or undefined. */
export function option(argv, name) {
  const i = argv.indexOf(name);
  return i >= 0 ? argv[i + 1] : undefined;
}

/** argv without `--name value` pairs (for the names given) and without bare `--flags`. */
export function positional(argv, valued) {
  const out = [];
  for (let i = 0; i < argv.length; i++) {
    if (valued.includes(argv[i])) i++;
    else if (!argv[i].startsWith("--")) out.push(argv[i]);
  }
  return out;
}

/**
 * The RPC URL and token address to use: --rpc/--token, then --stack DIR, then $X402_RPC_URL/
 * $X402_ASSET, then $X402_STACK, then anvil's default port and the deterministic token address.
 */
export function chainConfig(argv = process.argv) {
  const stack = loadStack(argv);
  const explicit = argv.includes("--stack");
  const pick = (flag, envName, fromStack, fallback) =>
    option(argv, flag) ?? (explicit ? fromStack : undefined) ?? process.env[envName] ?? fromStack ?? fallback;
  return {
    stack,
    rpcUrl: pick("--rpc", "X402_RPC_URL", stack?.rpcUrl, "http://127.0.0.1:8545"),
    token: pick("--token", "X402_ASSET", stack?.asset, TOKEN_ADDRESS),
  };
}

/** JSON.stringify that writes bigints as decimal strings. */
export function toJson(value, space) {
  return JSON.stringify(value, (_, v) => (typeof v === "bigint" ? v.toString() : v), space);
}

/** The ERC-20 / EIP-3009 ABI fragments these scripts call on TestUSDC. */
export const tokenAbi = [
  { type: "function", name: "balanceOf", stateMutability: "view", inputs: [{ name: "account", type: "address" }], outputs: [{ type: "uint256" }] },
  { type: "function", name: "mint", stateMutability: "nonpayable", inputs: [{ name: "to", type: "address" }, { name: "value", type: "uint256" }], outputs: [{ type: "bool" }] },
  { type: "function", name: "authorizationState", stateMutability: "view", inputs: [{ name: "authorizer", type: "address" }, { name: "nonce", type: "bytes32" }], outputs: [{ type: "bool" }] },
];
