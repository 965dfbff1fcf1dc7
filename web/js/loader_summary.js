// What a loader of the pack detected (family, tokens, the encoder it needs), shown on the node
// after a run so a wrong CLIP vision model or adapter is visible before sampling.
//
// One line drawn in a slot row whose left side is free (beside the output), else in the title bar:
// the node never changes size, so it never grows over the node below and never squeezes the file
// widget. The full text is the canvas' title (the browser's own tooltip) while the pointer is on it.
import { app } from "../../scripts/app.js";

const FONT = "12px Arial";
const PAD = 8;

function slotHeight() {
  return globalThis.LiteGraph?.NODE_SLOT_HEIGHT ?? 20;
}

function titleHeight() {
  return globalThis.LiteGraph?.NODE_TITLE_HEIGHT ?? 30;
}

/** Where the line goes, in node-local coordinates: [x, y, w, h] (y < 0: the title bar). */
export function summaryRect(node, ctx) {
  const H = slotHeight();
  // slots drawn as rows: a widget's own input socket sits on its widget, not in a row
  const inputs = (node.inputs ?? []).filter((i) => !i.widget).length;
  const outputs = node.outputs ?? [];
  ctx.font = FONT;
  // the first row whose left side holds no input: beside that row's output label
  for (let row = inputs; row < outputs.length; row++) {
    const out = outputs[row];
    const label = out.label ?? out.localized_name ?? out.name ?? "";
    const right = node.size[0] - ctx.measureText(label).width - 2 * PAD - 10;
    if (right - PAD >= 60) return [PAD, row * H + 2, right - PAD, H - 4];
  }
  // else after the title text
  ctx.font = `${globalThis.LiteGraph?.NODE_TEXT_SIZE ?? 14}px Arial`;
  const titleW = ctx.measureText(node.getTitle?.() ?? node.title ?? "").width;
  ctx.font = FONT;
  const left = titleW + 48;
  return [left, -titleHeight() + 4, Math.max(0, node.size[0] - left - PAD), titleHeight() - 8];
}

function ellipsize(ctx, text, width) {
  if (ctx.measureText(text).width <= width) return text;
  let lo = 0, hi = text.length;
  while (lo < hi) {
    const mid = (lo + hi + 1) >> 1;
    if (ctx.measureText(text.slice(0, mid) + "…").width <= width) lo = mid;
    else hi = mid - 1;
  }
  return lo ? text.slice(0, lo) + "…" : "";
}

function install(nodeType) {
  const onExecuted = nodeType.prototype.onExecuted;
  nodeType.prototype.onExecuted = function (message) {
    onExecuted?.apply(this, arguments);
    const lines = message?.ipadapter_info;
    if (!lines?.length) return;
    this.ipafSummary = lines.join("\n");
    this.setDirtyCanvas?.(true, true);
  };

  const onDrawForeground = nodeType.prototype.onDrawForeground;
  nodeType.prototype.onDrawForeground = function (ctx) {
    const r = onDrawForeground?.apply(this, arguments);
    if (!this.ipafSummary || this.flags?.collapsed) return r;
    const [x, y, w, h] = summaryRect(this, ctx);
    this.ipafSummaryRect = [x, y, w, h];
    if (w <= 0) return r;
    ctx.save();
    ctx.font = FONT;
    ctx.fillStyle = "#8fb8e0";
    ctx.textAlign = "left";
    ctx.textBaseline = "middle";
    ctx.fillText(ellipsize(ctx, this.ipafSummary.replace(/\s*\n\s*/g, " · "), w), x, y + h / 2);
    ctx.restore();
    return r;
  };

  // the full text as the canvas' native tooltip while the pointer is on the line
  const onMouseMove = nodeType.prototype.onMouseMove;
  nodeType.prototype.onMouseMove = function (e, pos) {
    const r = onMouseMove?.apply(this, arguments);
    const rect = this.ipafSummaryRect;
    const el = app.canvas?.canvas;
    if (el && rect && this.ipafSummary) {
      const inside = pos[0] >= rect[0] && pos[0] <= rect[0] + rect[2] && pos[1] >= rect[1] && pos[1] <= rect[1] + rect[3];
      if (inside) el.title = this.ipafSummary;
      else if (el.title === this.ipafSummary) el.title = "";
    }
    return r;
  };
  const onMouseLeave = nodeType.prototype.onMouseLeave;
  nodeType.prototype.onMouseLeave = function () {
    const r = onMouseLeave?.apply(this, arguments);
    const el = app.canvas?.canvas;
    if (el && el.title === this.ipafSummary) el.title = "";
    return r;
  };
}

app.registerExtension({
  name: "ipadapter_fused.loader_summary",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    // every loader of the pack that reports what it detected (its outputs include the adapter)
    if (nodeData.name?.startsWith("IPAdapterFused") && (nodeData.output ?? []).includes("IPADAPTER_FUSED")) install(nodeType);
  },
});
