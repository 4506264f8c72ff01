#!/usr/bin/env node
// lb-sticky's `lb` command: finds the lb binary of this platform's package (an
// optionalDependency that npm installs only where its os/cpu/libc match, as esbuild and biome
// ship theirs) and runs it, passing signals on, exiting as it exits. No postinstall download:
// it works offline and under --ignore-scripts.
'use strict';
const { spawn } = require('node:child_process');
const { platformPackage, findBinary } = require('./resolve.js');

const found = findBinary(process.env, require.resolve);
if (found.error) {
  process.stderr.write(`lb: error: ${found.error}\n`);
  process.exit(2);
}
const child = spawn(found.path, process.argv.slice(2), { stdio: 'inherit' });
// lb handles these itself (graceful stop, reload, rolling restart): the wrapper only relays them.
for (const sig of ['SIGTERM', 'SIGINT', 'SIGHUP', 'SIGUSR2', 'SIGQUIT']) {
  process.on(sig, () => child.kill(sig));
}
// `npx lb` (npm exec) does not pass SIGTERM on: it dies and leaves this process behind. So
// when whoever started us is gone, lb is stopped gracefully, as if it had been signalled.
const parent = process.ppid;
setInterval(() => {
  if (process.ppid !== parent) child.kill('SIGTERM');
}, 250).unref();
child.on('error', (e) => {
  process.stderr.write(`lb: error: cannot run ${found.path} (${platformPackage()}): ${e.message}\n`);
  process.exit(2);
});
child.on('exit', (code, signal) => {
  if (signal) {
    process.removeAllListeners(signal);
    process.kill(process.pid, signal);
  } else {
    process.exit(code ?? 1);
  }
});
