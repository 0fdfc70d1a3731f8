// Runs a wasm32-wasip1 command module under node's WASI (V8, as in Envoy).
import { readFile } from 'node:fs/promises';
import { WASI } from 'node:wasi';
import { argv, env } from 'node:process';
const wasi = new WASI({ version: 'preview1', args: argv.slice(2), env, preopens: {} });
const module = await WebAssembly.compile(await readFile(argv[2]));
const imports = wasi.getImportObject();
for (const imp of WebAssembly.Module.imports(module)) {
  if (!(imp.module in imports)) imports[imp.module] = {};
  if (!(imp.name in imports[imp.module])) { imports[imp.module][imp.name] = () => { throw new Error('unexpected ' + imp.name); }; }
}
const instance = await WebAssembly.instantiate(module, imports);
// proxy-wasm's rlib also exports _initialize; node refuses a command module with both.
const exports = Object.fromEntries(Object.entries(instance.exports).filter(([k]) => k !== '_initialize'));
wasi.start({ exports });
