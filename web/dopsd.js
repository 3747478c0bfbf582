// comfyui-dopsd front-end extension (placeholder: the training UI replaces this file).
// It only registers the extension so ComfyUI lists and loads the pack's JavaScript.
import { app } from "../../scripts/app.js";

app.registerExtension({
  name: "dopsd.core",
  async setup() {
    window.__DOPSD_WEB_LOADED__ = true;
  },
});
