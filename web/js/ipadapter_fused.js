// Shows what the loader detected (family, tokens, the encoder it needs) on the node
// itself, so a wrong CLIP vision model or adapter is visible before sampling.
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

app.registerExtension({
  name: "ipadapter_fused.loader_info",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== "IPAdapterFusedLoader") return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = (message?.ipadapter_info ?? []).join("\n");
      let widget = this.widgets?.find((w) => w.name === "detected");
      if (!widget) {
        widget = ComfyWidgets.STRING(this, "detected", ["STRING", { multiline: true }], app).widget;
        if (widget.inputEl) widget.inputEl.readOnly = true;
        widget.serialize = false;
      }
      widget.value = text;
      this.setDirtyCanvas(true, true);
    };
  },
});
