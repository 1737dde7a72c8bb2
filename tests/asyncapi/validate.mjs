// Parses and validates an AsyncAPI document with @asyncapi/parser, the AsyncAPI project's
// own parser. Prints every diagnostic as one JSON line on stdout and exits 1 if any is an
// error or a warning, 0 otherwise. Usage: node validate.mjs <document.json>
import { readFile } from "node:fs/promises";
import { Parser } from "@asyncapi/parser";

const path = process.argv[2];
const text = await readFile(path, "utf8");
const { document, diagnostics } = await new Parser().parse(text, { source: path });
// Spectral severities: 0 error, 1 warning, 2 information, 3 hint.
const serious = diagnostics.filter((d) => d.severity <= 1);
for (const d of diagnostics) {
  console.log(JSON.stringify({ severity: d.severity, code: d.code, message: d.message, path: d.path }));
}
if (document === undefined || serious.length > 0) process.exit(1);
console.log(JSON.stringify({ ok: true, version: document.version(), messages: document.allMessages().length }));
