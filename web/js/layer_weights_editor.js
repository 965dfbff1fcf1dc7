// Per-layer weight editor on "Apply IPAdapter (Fused)": one bar per attention layer of the chosen
// model family, grouped by block, with the weight types as bar-pattern presets. Every edit writes
// the node's own `layer_weights` (and `weight_type`) widgets in the pack's syntax, so a saved
// workflow carries the result and nothing of this editor is needed at run time.
// The logic (layouts, presets, string syntax) lives in layer_weights_logic.js, tested under Node.
import { app } from "../../scripts/app.js";
import * as L from "./layer_weights_logic.js";

const NODE_TYPES = new Set(["IPAdapterFusedApply"]);
const BAR_MAX = 1.5; // the bars' full height; the string itself takes any factor
const STEP = 0.05;
const STYLE_ID = "ipaf-layer-editor-style";
const TITLE_BUTTON = "ipaf_layer_weights";

function widget(node, name) {
  return node.widgets?.find((w) => w.name === name);
}

function setWidget(node, name, value) {
  const w = widget(node, name);
  if (!w || w.value === value) return;
  w.value = value;
  w.callback?.(value, app.canvas, node);
}

// The family: the one picked in the editor (saved in the node's properties), else the one the
// string's block names imply, else the one the connected loader detected on its last run.
function familyOf(node) {
  const saved = node.properties?.ipaf_layer_family;
  if (saved && L.FAMILIES[saved]) return saved;
  const guessed = L.guessFamily(widget(node, "layer_weights")?.value);
  if (guessed) return guessed;
  const link = node.inputs?.find((i) => i.name === "ipadapter")?.link;
  const origin = link != null ? node.graph?.links?.[link] ?? node.graph?.links?.get?.(link) : null;
  const loader = origin ? node.graph.getNodeById(origin.origin_id) : null;
  return L.familyFromSummary(loader?.ipafSummary) ?? "sdxl";
}

// What the node does now, as factors: its layer_weights, else its weight_type's pattern.
function currentFactors(node, family) {
  const text = widget(node, "layer_weights")?.value ?? "";
  try {
    const parsed = L.parseLayerWeights(family, text);
    if (parsed) return { factors: parsed, error: null };
  } catch (e) {
    return { factors: new Array(L.layerCount(family)).fill(1), error: e.message };
  }
  const type = widget(node, "weight_type")?.value;
  const factors = L.presetsFor(family).includes(type)
    ? L.presetFactors(family, type, compositionRatio(node))
    : new Array(L.layerCount(family)).fill(1);
  return { factors, error: null };
}

function compositionRatio(node) {
  const w = Number(widget(node, "weight")?.value);
  const wc = Number(widget(node, "weight_composition")?.value ?? w);
  return Number.isFinite(w) && w !== 0 && Number.isFinite(wc) ? wc / w : 1;
}

function addStyle() {
  if (document.getElementById(STYLE_ID)) return;
  const s = document.createElement("style");
  s.id = STYLE_ID;
  s.textContent = `
  .ipaf-le { position: fixed; z-index: 10000; left: 50%; top: 50%; transform: translate(-50%, -50%);
    background: #222; color: #ddd; border: 1px solid #555; border-radius: 8px; padding: 12px;
    font: 12px sans-serif; max-width: 92vw; box-shadow: 0 6px 30px #000a; }
  .ipaf-le header { display: flex; gap: 8px; align-items: center; margin-bottom: 8px; }
  .ipaf-le header b { flex: 1; }
  .ipaf-le button, .ipaf-le select { background: #333; color: #ddd; border: 1px solid #555; border-radius: 4px;
    padding: 2px 6px; cursor: pointer; font: inherit; }
  .ipaf-le .presets { display: flex; flex-wrap: wrap; gap: 4px; margin-bottom: 10px; max-width: 880px; }
  .ipaf-le .presets button { display: flex; flex-direction: column; align-items: center; gap: 2px; }
  .ipaf-le .presets button.on { border-color: #8cf; }
  .ipaf-le .groups { display: flex; gap: 10px; overflow-x: auto; padding-bottom: 4px; }
  .ipaf-le fieldset { border: 1px solid #444; border-radius: 4px; padding: 4px 6px 2px; margin: 0; }
  .ipaf-le legend { padding: 0 4px; color: #aaa; }
  .ipaf-le .bars { display: flex; gap: 2px; align-items: flex-end; height: 90px; }
  .ipaf-le .bar { width: 12px; height: 90px; background: #2c2c2c; position: relative; cursor: ns-resize;
    touch-action: none; }
  .ipaf-le .bar i { position: absolute; left: 0; right: 0; bottom: 0; background: #6a9fd8; }
  .ipaf-le .bar.zero i { background: #555; }
  .ipaf-le .bar .one { position: absolute; left: 0; right: 0; border-top: 1px dashed #888; }
  .ipaf-le .value { margin-top: 8px; font-family: monospace; word-break: break-all; max-width: 880px;
    max-height: 4.5em; overflow: auto; color: #bbb; }
  .ipaf-le .error { color: #f88; margin-top: 4px; }`;
  document.head.appendChild(s);
}

// A preset drawn as its bar pattern, the way the editor would set the bars.
function patternSvg(factors) {
  const w = Math.max(40, factors.length * 2), h = 16, bw = w / factors.length;
  const bars = factors.map((f, i) => {
    const bh = Math.max(0.5, (Math.min(f, BAR_MAX) / BAR_MAX) * h);
    return `<rect x="${(i * bw).toFixed(2)}" y="${(h - bh).toFixed(2)}" width="${Math.max(bw - 0.4, 0.6).toFixed(2)}" height="${bh.toFixed(2)}"/>`;
  }).join("");
  return `<svg width="${w}" height="${h}" viewBox="0 0 ${w} ${h}" fill="#6a9fd8">${bars}</svg>`;
}

let openDialog = null;

export function closeLayerEditor() {
  openDialog?.remove();
  openDialog = null;
}

/** Opens the editor for an apply node; returns its root element (the browser test drives it). */
export function openLayerEditor(node) {
  closeLayerEditor();
  addStyle();
  const root = document.createElement("div");
  root.className = "ipaf-le";
  root.dataset.node = String(node.id);
  openDialog = root;

  let family = familyOf(node);
  let factors = [];
  let activePreset = null;

  const header = document.createElement("header");
  header.innerHTML = `<b>Layer weights: ${node.title ?? "Apply IPAdapter"}</b>`;
  const select = document.createElement("select");
  select.dataset.role = "family";
  select.title = "The model family whose layers to show (the front-end cannot know the model before a run)";
  for (const id of L.FAMILY_IDS) select.add(new Option(L.FAMILIES[id].title, id));
  const clear = document.createElement("button");
  clear.textContent = "Clear";
  clear.title = "Empty layer_weights: the node follows weight_type again";
  const close = document.createElement("button");
  close.textContent = "Close";
  close.dataset.role = "close";
  header.append(select, clear, close);

  const presets = document.createElement("div");
  presets.className = "presets";
  const groups = document.createElement("div");
  groups.className = "groups";
  const value = document.createElement("div");
  value.className = "value";
  value.dataset.role = "value";
  const error = document.createElement("div");
  error.className = "error";
  root.append(header, presets, groups, value, error);

  const write = () => {
    setWidget(node, "layer_weights", L.formatLayerWeights(family, factors));
    node.setDirtyCanvas?.(true, true);
  };

  const renderBars = () => {
    for (const bar of groups.querySelectorAll(".bar")) {
      const f = factors[Number(bar.dataset.index)];
      bar.querySelector("i").style.height = `${(Math.min(f, BAR_MAX) / BAR_MAX) * 100}%`;
      bar.classList.toggle("zero", f === 0);
      bar.title = `${bar.dataset.label}: ${Number(f.toFixed(4))}`;
    }
    for (const b of presets.querySelectorAll("button")) b.classList.toggle("on", b.dataset.preset === activePreset);
    value.textContent = `layer_weights = ${widget(node, "layer_weights")?.value || "(empty: weight_type decides)"}`;
  };

  const build = () => {
    select.value = family;
    const now = currentFactors(node, family);
    factors = now.factors;
    error.textContent = now.error ?? "";
    presets.replaceChildren();
    for (const type of L.presetsFor(family)) {
      const b = document.createElement("button");
      b.dataset.preset = type;
      b.title = `weight_type '${type}' as per-layer factors`;
      b.innerHTML = `${patternSvg(L.presetFactors(family, type, compositionRatio(node)))}<span>${type}</span>`;
      b.onclick = () => {
        const p = L.applyPreset(family, type, compositionRatio(node));
        factors = p.factors.slice();
        activePreset = type;
        setWidget(node, "weight_type", p.weightType);
        setWidget(node, "layer_weights", p.layerWeights);
        node.setDirtyCanvas?.(true, true);
        renderBars();
      };
      presets.appendChild(b);
    }
    groups.replaceChildren();
    for (const g of L.layout(family)) {
      const fs = document.createElement("fieldset");
      fs.innerHTML = `<legend>${g.block} (${g.layers.length})</legend>`;
      const bars = document.createElement("div");
      bars.className = "bars";
      for (const layer of g.layers) {
        const bar = document.createElement("div");
        bar.className = "bar";
        bar.dataset.index = String(layer.index);
        bar.dataset.label = layer.label;
        bar.innerHTML = `<span class="one" style="bottom:${(100 / BAR_MAX).toFixed(2)}%"></span><i></i>`;
        const set = (e) => {
          const r = bar.getBoundingClientRect();
          const f = Math.round(((1 - (e.clientY - r.top) / r.height) * BAR_MAX) / STEP) * STEP;
          factors[layer.index] = Math.min(BAR_MAX, Math.max(0, Number(f.toFixed(4))));
          activePreset = null;
          // hand-set bars are 'custom'; the precise types keep their token swap only while untouched
          setWidget(node, "weight_type", "custom");
          write();
          renderBars();
        };
        bar.onpointerdown = (e) => {
          bar.setPointerCapture?.(e.pointerId);
          set(e);
          bar.onpointermove = (m) => { if (m.buttons) set(m); };
        };
        bar.onpointerup = () => { bar.onpointermove = null; };
        bars.appendChild(bar);
      }
      fs.appendChild(bars);
      groups.appendChild(fs);
    }
    renderBars();
  };

  select.onchange = () => {
    family = select.value;
    node.properties = { ...(node.properties ?? {}), ipaf_layer_family: family };
    activePreset = null;
    build();
  };
  clear.onclick = () => {
    setWidget(node, "layer_weights", "");
    if (widget(node, "weight_type")?.value === "custom") setWidget(node, "weight_type", "linear");
    activePreset = null;
    build();
  };
  close.onclick = closeLayerEditor;
  root.addEventListener("keydown", (e) => { if (e.key === "Escape") closeLayerEditor(); });

  build();
  document.body.appendChild(root);
  return root;
}

app.registerExtension({
  name: "ipadapter_fused.layer_weights_editor",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!NODE_TYPES.has(nodeData.name)) return;
    // A title-bar button and a context-menu entry, not a widget: a widget would grow the node over
    // the one below it in saved workflows, and add a value to widgets_values.
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = onNodeCreated?.apply(this, arguments);
      this.addTitleButton?.({ name: TITLE_BUTTON, text: "\u2261 layers", fontSize: 12, xOffset: -6 });
      return r;
    };
    const onTitleButtonClick = nodeType.prototype.onTitleButtonClick;
    nodeType.prototype.onTitleButtonClick = function (button, canvas) {
      if (button?.name === TITLE_BUTTON) return openLayerEditor(this);
      return onTitleButtonClick?.apply(this, arguments);
    };
    const getExtraMenuOptions = nodeType.prototype.getExtraMenuOptions;
    nodeType.prototype.getExtraMenuOptions = function (canvas, options) {
      const r = getExtraMenuOptions?.apply(this, arguments);
      options.unshift({ content: "Edit layer weights", callback: () => openLayerEditor(this) }, null);
      return r;
    };
  },
});

// For the browser test and for other scripts: open the editor on a node by hand.
window.ipadapterFused = { ...(window.ipadapterFused ?? {}), openLayerEditor, closeLayerEditor };
