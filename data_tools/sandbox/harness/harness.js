'use strict';
// Preloaded with `node --require ./_sandbox_harness.js main.js`. Tells a failed test from a crash by
// the exit status: an uncaught assertion error (the assert module, or console.assert, which is made
// to throw) exits with 117, a syntax error in a CommonJS main.js with 118, anything else with 1.
// Also defines the completion step the sandbox appends after the tests (below).
const assert = require('assert');
const fs = require('fs');
const Module = require('module');
const vm = require('vm');

const TEST_FAILED = 117;
const SYNTAX_ERROR = 118;

function isAssertion(error) {
  return error instanceof assert.AssertionError ||
    (error !== null && typeof error === 'object' && (error.code === 'ERR_ASSERTION' || error.name === 'AssertionError'));
}

function die(error) {
  const text = error && error.stack ? error.stack : String(error);
  try { fs.writeSync(2, `Uncaught ${text}\n`); } catch (_) { /* stderr closed: the status still tells */ }
  process.exit(isAssertion(error) ? TEST_FAILED : 1);
}

// Called by the line the sandbox appends after the tests (recipes.py): creates the completion marker
// named by $MCODE_SANDBOX_COMPLETION_FILE. A process.exit(0) (or a top-level return) before the end of
// the tests never reaches it, so the sandbox does not count it as a pass (data_tools/sandbox/completion.py).
// Read now: the program may change its environment.
const completionMarker = process.env.MCODE_SANDBOX_COMPLETION_FILE;
Object.defineProperty(globalThis, '__mcodeSandboxTestsCompleted', {
  value: function sandboxTestsCompleted() {
    if (!completionMarker) return;
    try { fs.writeFileSync(completionMarker, ''); } catch (_) { /* no marker, no pass: the sandbox reports it */ }
  },
});

process.on('uncaughtException', die);
process.on('unhandledRejection', die);

// console.assert only prints; a test written with it must still fail when the check does.
console.assert = function sandboxAssert(condition, ...message) {
  if (!condition) {
    throw new assert.AssertionError({ message: ['console.assert failed', ...message].join(' '), stackStartFn: sandboxAssert });
  }
};

// Compile (not run) a CommonJS main first, so a syntax error is reported as such and not as a crash.
const main = process.argv[1];
if (main && main.endsWith('.js')) {
  const source = fs.readFileSync(main, 'utf8').replace(/^#!.*/, '');
  try {
    new vm.Script(Module.wrap(source), { filename: main });
  } catch (error) {
    if (error instanceof SyntaxError) {
      // The code frame and message, without the harness's own stack below them.
      fs.writeSync(2, `${main}: ${String(error.stack).split('\n    at ')[0]}\n`);
      process.exit(SYNTAX_ERROR);
    }
  }
}
