// Mints TestUSDC to an address (the minter is anvil account 0, the token's deployer), for tests
// that need a funded wallet or a top-up; prints {"address","minted","balance","transaction"}:
//   node x402/fund.mjs ADDRESS UNITS [--stack DIR] [--rpc URL] [--token ADDRESS]
// UNITS in 10^-6 USDC (1 USDC = 1000000). RPC URL and token as for balance.mjs.
import { createPublicClient, createWalletClient, http, getAddress } from "viem";
import { privateKeyToAccount } from "viem/accounts";
import { ROLES, chainConfig, devAccount, localChain, positional, tokenAbi } from "./lib.mjs";

const argv = process.argv.slice(2);
const [to, units] = positional(argv, ["--stack", "--rpc", "--token"]);
if (!to || !/^\d+$/.test(units ?? "")) {
  console.error("usage: node x402/fund.mjs ADDRESS UNITS [--stack DIR] [--rpc URL] [--token ADDRESS]");
  process.exit(2);
}
const { rpcUrl, token } = chainConfig(argv);
const chain = localChain(rpcUrl);
const transport = http(rpcUrl, { retryCount: 0 });
const publicClient = createPublicClient({ chain, transport, pollingInterval: 100 });
const wallet = createWalletClient({ chain, transport, account: privateKeyToAccount(devAccount(ROLES.deployer).privateKey) });
const address = getAddress(to);
const hash = await wallet.writeContract({ address: token, abi: tokenAbi, functionName: "mint", args: [address, BigInt(units)] });
const receipt = await publicClient.waitForTransactionReceipt({ hash });
if (receipt.status !== "success") {
  console.error(`fund: mint reverted (${hash})`);
  process.exit(1);
}
const balance = await publicClient.readContract({ address: token, abi: tokenAbi, functionName: "balanceOf", args: [address] });
console.log(JSON.stringify({ address, minted: units, balance: balance.toString(), transaction: hash }));
