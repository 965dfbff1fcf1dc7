// node --test tests/web/ : the editor's logic (web/js/layer_weights_logic.js) against the pack's
// schedules. schedules_fixture.json is nodes/schedules.py's own answer (tests/test_web_logic.py
// checks it is current), so these compare the JS with the Python, not with themselves.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import * as L from "../../web/js/layer_weights_logic.js";

const fixture = JSON.parse(readFileSync(new URL("./schedules_fixture.json", import.meta.url), "utf8"));

const close = (got, want, msg) => {
  assert.equal(got.length, want.length, msg);
  got.forEach((g, i) => assert.ok(Math.abs(g - want[i]) < 1e-12, `${msg}: layer ${i} ${g} != ${want[i]}`));
};

test("layer counts and groups of every family", () => {
  const shape = (f) => L.layout(f).map((g) => `${g.block}:${g.layers.length}`).join(" ");
  assert.equal(shape("sd15"), "input:6 middle:1 output:9");
  assert.equal(shape("sdxl"), "input:4 middle:1 output:6");
  assert.equal(shape("flux"), "double:19 single:38");
  assert.equal(shape("sd35"), "joint:38");
  for (const f of L.FAMILY_IDS) {
    const idx = L.layout(f).flatMap((g) => g.layers.map((l) => l.index));
    assert.deepEqual(idx, [...idx.keys()], `${f}: forward order`);
  }
});

test("every preset's factors equal nodes/schedules.py's (fixture)", () => {
  const seen = new Set();
  for (const f of L.FAMILY_IDS) {
    for (const t of L.presetsFor(f)) {
      const want = fixture[`${f}/${t}`];
      assert.ok(want, `${f}/${t} missing from the fixture`);
      close(L.presetFactors(f, t), want.factors, `${f}/${t}`);
      assert.equal(L.applyPreset(f, t).weightType, want.swap.some(Boolean) ? t : "custom", `${f}/${t}`);
      seen.add(`${f}/${t}`);
    }
  }
  assert.deepEqual([...seen].sort(), Object.keys(fixture).sort(), "the fixture has presets the editor lacks");
});

test("style and composition presets differ by family, as the tables do", () => {
  assert.deepEqual(L.applyPreset("sdxl", "style transfer").layerWeights, "6:1");
  assert.deepEqual(L.applyPreset("sd15", "composition").layerWeights, "4:0.25, 5:1");
  assert.throws(() => L.presetFactors("flux", "style transfer"), /no meaning on Flux/);
});

test("factors -> string -> factors round trip on every family", () => {
  for (const f of L.FAMILY_IDS) {
    const n = L.layerCount(f);
    const factors = Array.from({ length: n }, (_, i) => (i % 3 === 0 ? 0 : Math.round((i * 0.37) % 2 * 1000) / 1000));
    const text = L.formatLayerWeights(f, factors);
    assert.deepEqual(L.parseLayerWeights(f, text), factors, `${f}: ${text}`);
    for (const t of L.presetsFor(f)) {
      const { layerWeights, factors: pf } = L.applyPreset(f, t);
      L.parseLayerWeights(f, layerWeights).forEach((g, i) => assert.ok(Math.abs(g - pf[i]) <= 5e-5, `${f}/${t}`));
    }
  }
});

test("the strings the pack documents parse, and the ones it refuses throw", () => {
  const flux = L.parseLayerWeights("flux", "d0:1.0, s3:0.5");
  assert.equal(flux[0], 1);
  assert.equal(flux[19 + 3], 0.5);
  assert.equal(flux.filter(Boolean).length, 2);
  assert.deepEqual(L.parseLayerWeights("sdxl", "1, 0.5").slice(0, 3), [1, 0.5, 0]);
  assert.equal(L.parseLayerWeights("sd15", "  "), null);
  assert.equal(L.parseLayerWeights("flux", "3:2")[3], 2);
  assert.throws(() => L.parseLayerWeights("sdxl", "11:1"), /does not have/);
  assert.throws(() => L.parseLayerWeights("sd35", "s0:1"), /does not have/);
  assert.throws(() => L.parseLayerWeights("sd15", "0:1, 0.5"), /mixes/);
  assert.throws(() => L.parseLayerWeights("sd15", "0:nan"), /finite/);
  assert.throws(() => L.parseLayerWeights("sdxl", Array(12).fill("1").join(",")), /12 factors/);
  assert.equal(L.formatLayerWeights("sd15", new Array(16).fill(0)), "0:0");
  assert.throws(() => L.formatLayerWeights("sd15", [1]), /16 layers/);
});

test("the family is guessed from the names a string uses", () => {
  assert.equal(L.guessFamily("d0:1, s3:0.5"), "flux");
  assert.equal(L.guessFamily("d30:1"), "sd35");
  assert.equal(L.guessFamily("0:1, 6:0.5"), null);
  assert.equal(L.guessFamily(""), null);
});

test("the family is read off a loader's detection summary", () => {
  assert.equal(L.familyFromSummary("IP-Adapter Plus for SDXL: 16 image tokens from CLIP ViT-H/14"), "sdxl");
  assert.equal(L.familyFromSummary("IP-Adapter for SD1.5: 4 image tokens"), "sd15");
  assert.equal(L.familyFromSummary("InstantX IP-Adapter for Flux: 128 image tokens"), "flux");
  assert.equal(L.familyFromSummary("InstantX IP-Adapter for SD3.5: 64 image tokens"), "sd35");
  assert.equal(L.familyFromSummary("IP-Adapter for an unrecognised base model: 4 tokens"), null);
});
