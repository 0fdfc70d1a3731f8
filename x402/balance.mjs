// Prints the TestUSDC balance of one or more addresses as JSON (units of 10^-6 USDC):
//   node x402/balance.mjs ADDRESS [ADDRESS…] [--stack DIR] [--rpc URL] [--token ADDRESS]
// one address: {"address","balance","token","decimals"}; several: an array of those.
// RPC URL and token: flags, else $X402_RPC_URL/$X402_ASSET, else DIR/x402.json
// (--stack or $X402_STACK), else http://127.0.0.1:8545 and 0x5FbDB2315678afecb367f032d93F642f64180aa3.
import { createPublicClient, http, getAddress } from "viem";
import { TOKEN, chainConfig, localChain, positional, tokenAbi } from "./lib.mjs";

const argv = process.argv.slice(2);
const addresses = positional(argv, ["--stack", "--rpc", "--token"]);
if (addresses.length === 0) {
  console.error("usage: node x402/balance.mjs ADDRESS [ADDRESS…] [--stack DIR] [--rpc URL] [--token ADDRESS]");
  process.exit(2);
}
const { rpcUrl, token } = chainConfig(argv);
const client = createPublicClient({ chain: localChain(rpcUrl), transport: http(rpcUrl, { retryCount: 0 }) });
const rows = await Promise.all(
  addresses.map(async (a) => {
    const address = getAddress(a);
    const balance = await client.readContract({ address: token, abi: tokenAbi, functionName: "balanceOf", args: [address] });
    return { address, balance: balance.toString(), token: getAddress(token), decimals: TOKEN.decimals };
  }),
);
console.log(JSON.stringify(rows.length === 1 ? rows[0] : rows));
