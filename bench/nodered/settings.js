// Node-RED settings for the benchmark peer (bench/nodered.py passes the paths and ports).
// No editor, no HTTP endpoints: only the flow runs, like a deployed plant flow.
module.exports = {
  flowFile: process.env.BENCH_NR_FLOWS,
  userDir: process.env.BENCH_NR_USERDIR,
  httpAdminRoot: false,
  httpNodeRoot: false,
  uiHost: "127.0.0.1",
  uiPort: parseInt(process.env.BENCH_NR_UIPORT || "0", 10),
  credentialSecret: false,
  flowFilePretty: false,
  diagnostics: { enabled: false, ui: false },
  telemetry: { enabled: false },
  runtimeState: { enabled: false, ui: false },
  logging: { console: { level: "warn", metrics: false, audit: false } },
  editorTheme: { projects: { enabled: false } },
  // The function node builds the SHA-256 chain with node's own crypto.
  functionGlobalContext: {
    crypto: require("crypto"),
    perf: require("perf_hooks").performance,
  },
};
