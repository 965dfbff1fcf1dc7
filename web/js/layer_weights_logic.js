// The per-layer weight editor's logic, with no browser or ComfyUI dependency so Node's own test
// runner can check it against nodes/schedules.py (tests/web/, tests/test_web_logic.py).
//
// It mirrors nodes/schedules.py: the same weight types resolve to the same factor per layer
// (weight 1), and the `layer_weights` string it writes is the syntax that module parses, so a saved
// workflow runs the same without this editor.

// Layers of each family, grouped as the editor draws them, in forward order (the order the
// schedules' "transformer index" / DiT block index counts).
// UNets: one entry per SpatialTransformer; its label is the host block that holds it.
// DiTs: d = double (Flux) or joint (SD3.5) block, s = single block.
function range(n) {
  return Array.from({ length: n }, (_, i) => i);
}

export const FAMILIES = {
  sd15: {
    title: "SD1.5",
    kind: "unet",
    groups: [
      { block: "input", host: [1, 2, 4, 5, 7, 8] },
      { block: "middle", host: [0] },
      { block: "output", host: [3, 4, 5, 6, 7, 8, 9, 10, 11] },
    ],
  },
  sdxl: {
    title: "SDXL",
    kind: "unet",
    groups: [
      { block: "input", host: [4, 5, 7, 8] },
      { block: "middle", host: [0] },
      { block: "output", host: [0, 1, 2, 3, 4, 5] },
    ],
  },
  flux: {
    title: "Flux",
    kind: "dit",
    groups: [
      { block: "double", prefix: "d", count: 19 },
      { block: "single", prefix: "s", count: 38 },
    ],
  },
  sd35: {
    title: "SD3.5",
    kind: "dit",
    groups: [{ block: "joint", prefix: "d", count: 38 }],
  },
};

export const FAMILY_IDS = Object.keys(FAMILIES);

// The weight types of nodes/schedules.py (WEIGHT_TYPES, DIT_WEIGHT_TYPES), less "custom".
export const UNET_PRESETS = [
  "linear", "ease in", "ease out", "ease in-out", "reverse in-out", "weak input", "weak output",
  "weak middle", "strong middle", "style transfer", "composition", "strong style transfer",
  "style and composition", "style transfer precise", "composition precise",
];
export const DIT_PRESETS = UNET_PRESETS.slice(0, 9);

// These two also move the image tokens to the negative rows on some layers, which a factor list
// cannot say: the editor keeps their weight_type and writes their factors beside it.
const SWAP_PRESETS = new Set(["style transfer precise", "composition precise"]);

function family(id) {
  const f = FAMILIES[id];
  if (!f) throw new Error(`unknown model family '${id}' (one of ${FAMILY_IDS.join(", ")})`);
  return f;
}

/** Groups of layers: [{block, layers: [{index, label, name}]}], index in forward order. */
export function layout(familyId) {
  const f = family(familyId);
  let index = 0;
  return f.groups.map((g) => {
    const layers = f.kind === "unet"
      ? g.host.map((h) => ({ index: index++, label: `${g.block} ${h}`, name: String(index - 1) }))
      : range(g.count).map((i) => ({ index: index++, label: `${g.block} ${i}`, name: `${g.prefix}${i}` }));
    return { block: g.block, layers };
  });
}

export function layerCount(familyId) {
  return layout(familyId).reduce((n, g) => n + g.layers.length, 0);
}

export function presetsFor(familyId) {
  return family(familyId).kind === "unet" ? UNET_PRESETS : DIT_PRESETS;
}

// Factor of layer t of n for the depth ramps (schedules._RAMPS).
const RAMPS = {
  "ease in": (t, n) => 0.05 + 0.95 * (1 - t / n),
  "ease out": (t, n) => 0.05 + 0.95 * (t / n),
  "ease in-out": (t, n) => 0.05 + 0.95 * (1 - Math.abs(t - n / 2) / (n / 2)),
  "reverse in-out": (t, n) => 0.05 + 0.95 * (Math.abs(t - n / 2) / (n / 2)),
};

// schedules._table with w = 1: transformer index -> factor, or null for the types that are not tables.
function unetTable(type, wc, sdxl) {
  const only = (idx, f = 1) => Object.fromEntries(idx.map((i) => [i, f]));
  switch (type) {
    case "style transfer":
      return sdxl ? only([6]) : only([0, 1, 2, 3, 9, 10, 11, 12, 13, 14, 15]);
    case "composition":
      return sdxl ? only([3]) : { 4: 0.25, 5: 1 };
    case "strong style transfer":
      return sdxl ? only([0, 1, 2, 4, 5, 6, 7, 8, 9, 10]) : only([0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]);
    case "style and composition":
    case "style transfer precise": {
      if (type === "style transfer precise") wc = 1;
      if (sdxl) return { 3: wc, 6: 1 };
      return { ...only([0, 1, 2, 3, 9, 10, 11, 12, 13, 14, 15]), 4: wc * 0.25, 5: wc };
    }
    case "composition precise":
      if (sdxl) return { ...only(range(11), 0.1), 3: 1, 6: 1 };
      return { ...only(range(16)), 4: 0.25, 5: 1, 6: 0.1, 7: 0.1, 8: 0.1 };
    default:
      return null;
  }
}

/**
 * Factor of every layer (forward order) for a weight type at weight 1, as nodes/schedules.py
 * resolves it. `composition` is weight_composition / weight (for "style and composition").
 */
export function presetFactors(familyId, type, composition = 1) {
  const f = family(familyId);
  if (!presetsFor(familyId).includes(type)) {
    throw new Error(`weight type '${type}' has no meaning on ${f.title}; use one of ${presetsFor(familyId).join(", ")}`);
  }
  const groups = layout(familyId);
  const n = layerCount(familyId);
  const out = [];
  if (f.kind === "unet") {
    const table = unetTable(type, composition, n === 11);
    for (const g of groups) {
      for (const { index: t } of g.layers) {
        if (table) out.push(table[t] ?? 0);
        else if (RAMPS[type]) out.push(RAMPS[type](t, n));
        else if ((type === "weak input" && g.block === "input") || (type === "weak middle" && g.block === "middle")
          || (type === "weak output" && g.block === "output")
          || (type === "strong middle" && g.block !== "middle")) out.push(0.2);
        else out.push(1);
      }
    }
    return out;
  }
  for (let t = 0; t < n; t++) {
    const third = Math.floor((3 * t) / n); // first, middle, last third of the blocks
    if (RAMPS[type]) out.push(RAMPS[type](t, n));
    else if ((type === "weak input" && third === 0) || (type === "weak middle" && third === 1)
      || (type === "weak output" && third === 2) || (type === "strong middle" && third !== 1)) out.push(0.2);
    else out.push(1);
  }
  return out;
}

/** What picking a preset writes: the weight_type widget's value and the layer_weights string. */
export function applyPreset(familyId, type, composition = 1) {
  const factors = presetFactors(familyId, type, composition);
  return { weightType: SWAP_PRESETS.has(type) ? type : "custom", layerWeights: formatLayerWeights(familyId, factors), factors };
}

function formatFactor(f) {
  return String(Number(f.toFixed(4)));
}

/**
 * Factors (forward order) -> the pack's layer_weights string: 'index:factor' pairs on UNets,
 * 'd0:1, s3:0.5' block names on DiTs. Layers at 0 are left out (the pack reads a missing layer as
 * 0); all at 0 still writes one pair, since an empty string means "use weight_type".
 */
export function formatLayerWeights(familyId, factors) {
  const names = layout(familyId).flatMap((g) => g.layers.map((l) => l.name));
  if (factors.length !== names.length) {
    throw new Error(`${FAMILIES[familyId].title} has ${names.length} layers, got ${factors.length} factors`);
  }
  const parts = [];
  factors.forEach((f, i) => {
    if (!Number.isFinite(f)) throw new Error(`factor ${i} is not a finite number`);
    if (formatFactor(f) !== "0") parts.push(`${names[i]}:${formatFactor(f)}`);
  });
  return (parts.length ? parts : [`${names[0]}:0`]).join(", ");
}

/**
 * The pack's layer_weights string -> factors in forward order (missing layers 0), or null for an
 * empty string (the node then follows weight_type). Throws with the same advice as the pack for a
 * string it would refuse.
 */
export function parseLayerWeights(familyId, text) {
  const f = family(familyId);
  text = (text ?? "").trim();
  if (!text) return null;
  const groups = layout(familyId);
  const n = layerCount(familyId);
  const byName = new Map(groups.flatMap((g) => g.layers.map((l) => [l.name.toLowerCase(), l.index])));
  const parts = text.replace(/\n/g, ",").split(",").map((p) => p.trim()).filter(Boolean);
  const pairs = parts.filter((p) => p.includes(":")).length;
  const number = (s) => {
    const v = Number(s.trim());
    if (s.trim() === "" || !Number.isFinite(v)) throw new Error(`layer_weights ${JSON.stringify(text)}: '${s.trim()}' is not a finite number`);
    return v;
  };
  const out = new Array(n).fill(0);
  if (pairs === parts.length) {
    for (const p of parts) {
      const [name, value] = [p.slice(0, p.indexOf(":")).trim().toLowerCase(), p.slice(p.indexOf(":") + 1)];
      let i;
      if (f.kind === "dit" && byName.has(name)) i = byName.get(name);
      else if (/^\d+$/.test(name) && Number(name) < n) i = Number(name);
      else throw new Error(`layer_weights names layer '${name}', which ${f.title} does not have`);
      out[i] = number(value);
    }
  } else if (pairs === 0) {
    if (parts.length > n) throw new Error(`layer_weights lists ${parts.length} factors but ${f.title} has ${n} layers`);
    parts.forEach((p, i) => { out[i] = number(p); });
  } else {
    throw new Error(`layer_weights ${JSON.stringify(text)} mixes 'layer:factor' pairs and plain factors`);
  }
  return out;
}

/**
 * The family a layer_weights string was most likely written for, from the names it uses: single
 * blocks only exist on Flux, d-blocks past d18 only on SD3.5; null when it does not say.
 */
export function guessFamily(text) {
  const names = (text ?? "").toLowerCase().match(/\b[ds]\d+\s*:/g) ?? [];
  if (names.some((m) => m.startsWith("s"))) return "flux";
  if (names.some((m) => Number(m.slice(1, -1).trim()) > 18)) return "sd35";
  if (names.length) return "flux";
  return null;
}

/** The family a loader's detection summary names ("... for SDXL: ..."), or null. */
export function familyFromSummary(text) {
  const m = /\bfor (SD1\.5|SDXL|Flux|SD3\.5)\b/.exec(text ?? "");
  return m ? { "SD1.5": "sd15", SDXL: "sdxl", Flux: "flux", "SD3.5": "sd35" }[m[1]] : null;
}
