// Validate AsyncAPI documents with the official parser (@asyncapi/parser).
//
//   node validate_asyncapi.js FILE...
//
// Prints one JSON line per file: {"file", "ok", "diagnostics": [{severity, code, message,
// path}]}, severity as the parser names it (error, warning, info, hint). Exit code 1 if any
// file has a diagnostic of severity error or warning, 2 on a usage or load error.
"use strict";

const fs = require("node:fs");
const { Parser, DiagnosticSeverity } = require("@asyncapi/parser");

const SEVERITY = {
  [DiagnosticSeverity.Error]: "error",
  [DiagnosticSeverity.Warning]: "warning",
  [DiagnosticSeverity.Information]: "info",
  [DiagnosticSeverity.Hint]: "hint",
};

async function main(files) {
  if (files.length === 0) {
    console.error("usage: node validate_asyncapi.js FILE...");
    return 2;
  }
  const parser = new Parser();
  let failed = false;
  for (const file of files) {
    const text = fs.readFileSync(file, "utf8");
    const { document, diagnostics } = await parser.parse(text, { source: file });
    const found = diagnostics.map((d) => ({
      severity: SEVERITY[d.severity] ?? String(d.severity),
      code: String(d.code),
      message: d.message,
      path: d.path.join("/"),
    }));
    const bad = found.filter((d) => d.severity === "error" || d.severity === "warning");
    const ok = document !== undefined && bad.length === 0;
    failed ||= !ok;
    console.log(JSON.stringify({ file, ok, parsed: document !== undefined, diagnostics: found }));
  }
  return failed ? 1 : 0;
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (err) => {
    console.error(err && err.stack ? err.stack : String(err));
    process.exit(2);
  },
);
