// Compiles contracts/TestUSDC.sol with solc-js (the pinned npm `solc`, offline) into
// build/TestUSDC.json (git-ignored), recompiling only when the source, the compiler or the
// settings change. `node x402/compile.mjs` prints the artifact's summary.
import { createHash } from "node:crypto";
import { mkdirSync, readFileSync, writeFileSync, existsSync, renameSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { createRequire } from "node:module";

const here = dirname(fileURLToPath(import.meta.url));
const SOURCE = join(here, "contracts", "TestUSDC.sol");
const ARTIFACT = join(here, "build", "TestUSDC.json");
// cancun: understood by anvil 1.7.1's default hardfork and by every current chain.
const SETTINGS = {
  optimizer: { enabled: true, runs: 200 },
  evmVersion: "cancun",
  outputSelection: { "*": { TestUSDC: ["abi", "evm.bytecode.object", "evm.deployedBytecode.object"] } },
};

export function compileTestUSDC() {
  const source = readFileSync(SOURCE, "utf8");
  const require = createRequire(import.meta.url);
  const solcVersion = require("solc/package.json").version;
  const key = createHash("sha256").update(JSON.stringify({ source, solcVersion, SETTINGS })).digest("hex");
  if (existsSync(ARTIFACT)) {
    const cached = JSON.parse(readFileSync(ARTIFACT, "utf8"));
    if (cached.key === key) return cached;
  }
  const solc = require("solc");
  const input = { language: "Solidity", sources: { "TestUSDC.sol": { content: source } }, settings: SETTINGS };
  const output = JSON.parse(solc.compile(JSON.stringify(input)));
  const errors = (output.errors ?? []).filter((e) => e.severity === "error");
  if (errors.length) throw new Error(errors.map((e) => e.formattedMessage).join("\n"));
  const c = output.contracts["TestUSDC.sol"].TestUSDC;
  const artifact = {
    contract: "TestUSDC",
    source: "x402/contracts/TestUSDC.sol",
    compiler: solc.version(),
    settings: SETTINGS,
    key,
    abi: c.abi,
    bytecode: `0x${c.evm.bytecode.object}`,
    deployedBytecode: `0x${c.evm.deployedBytecode.object}`,
  };
  mkdirSync(dirname(ARTIFACT), { recursive: true });
  writeFileSync(`${ARTIFACT}.tmp`, JSON.stringify(artifact, null, 1));
  renameSync(`${ARTIFACT}.tmp`, ARTIFACT);
  return artifact;
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const a = compileTestUSDC();
  console.log(JSON.stringify({ artifact: ARTIFACT, compiler: a.compiler, bytecodeBytes: (a.bytecode.length - 2) / 2, deployedBytes: (a.deployedBytecode.length - 2) / 2 }));
}
