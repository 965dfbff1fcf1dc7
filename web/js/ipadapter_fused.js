// The detection summary on loader nodes lives in loader_summary.js, the per-layer weight editor in
// layer_weights_editor.js (its logic: layer_weights_logic.js).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

// "Convert IPAdapter_plus nodes": the open graph goes to the pack's route (the conversion lives in
// Python, tools/ipaf_runner/migrate.py, shared with tools/migrate_workflow.py) and comes back converted.
async function convertIPAdapterPlusNodes() {
  const res = await api.fetchApi("/ipadapter_fused/migrate", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ workflow: app.graph.serialize() }),
  });
  const data = await res.json().catch(() => ({ error: `the server answered ${res.status}` }));
  if (!res.ok || data.error) {
    showMigrationReport("error", "Convert IPAdapter_plus nodes failed", data.error ?? `HTTP ${res.status}`);
    return;
  }
  if (data.report.converted.length) await app.loadGraphData(data.workflow);
  const level = data.report.left.length ? "warn" : "success";
  showMigrationReport(level, "Convert IPAdapter_plus nodes", data.report.text);
}

function showMigrationReport(severity, summary, detail) {
  const toast = app.extensionManager?.toast;
  if (toast?.add) toast.add({ severity, summary, detail, life: 15000 });
  else window.alert(`${summary}\n\n${detail}`);
  console.log(`[ipadapter_fused] ${summary}\n${detail}`);
}

app.registerExtension({
  name: "ipadapter_fused.migrate",
  commands: [{
    id: "ipadapter_fused.convert_ipadapter_plus",
    label: "Convert IPAdapter_plus nodes",
    function: convertIPAdapterPlusNodes,
  }],
  menuCommands: [{ path: ["Extensions", "IPAdapter Fused"], commands: ["ipadapter_fused.convert_ipadapter_plus"] }],
  // front ends after 1.27 also read canvas menu items from extensions (1.27 ignores this)
  getCanvasMenuItems() {
    return [null, { content: "Convert IPAdapter_plus nodes", callback: convertIPAdapterPlusNodes }];
  },
});
