"""ComfyUI's own SD1.5 UNet / CLIP-L / VAE, timed on request: the benchmark's ComfyUI side (its own venv).

Run by bench/run.py as `<comfyui venv python> bench/comfyui_worker.py <ComfyUI checkout>`; it reads one JSON
request per line on stdin and answers one JSON line each (on the original stdout; anything ComfyUI prints goes to
stderr). Requests:

- `{"op": "load", "path": ..., "dtype": "fp32"|"bf16", "force_compute": bool}`: `comfy.sd.load_checkpoint_guess_config`
  on the single file, UNet and text encoder stored in `dtype` (VAE fp32). On a CPU ComfyUI computes bf16 weights in
  fp32 (`unet_manual_cast`: `should_use_bf16` is False on CPUs); `force_compute` makes it compute in the weights'
  dtype instead (its manual cast off), for a bf16-against-bf16 comparison.
- `{"op": "inputs", "path": ...}`: a `torch.save`d dict with x, timestep, context, tokens, latents.
- `{"op": "run", "what": "unet"|"clip"|"vae", "save": path or null}`: one call, answered with its wall and CPU
  seconds (this process' CPU time); the output is saved (float32) when `save` is given.
- `{"op": "exit"}`.

Only torch and ComfyUI are imported: nothing of the pack (ComfyUI's torch is not ours).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any


def main() -> None:
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # ComfyUI's prints go to stderr
    sys.stdout = sys.stderr
    root = sys.argv[1]
    sys.path.insert(0, root)
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options

    comfy.options.enable_args_parsing()
    import torch

    threads = int(os.environ.get("FLUXION_BENCH_THREADS", "0") or 0)
    if threads:
        torch.set_num_threads(threads)
    import comfy.model_management as mm
    import comfy.sd

    state: dict[str, Any] = {}
    original_cast = mm.unet_manual_cast

    def load(request: dict[str, Any]) -> dict[str, Any]:
        state.pop("model", None)
        state.pop("clip", None)
        state.pop("vae", None)
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[request["dtype"]]
        mm.unet_manual_cast = (lambda *_, **__: None) if request.get("force_compute") else original_cast
        start = time.perf_counter()
        try:
            model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
                request["path"],
                output_vae=True,
                output_clip=True,
                model_options={"dtype": dtype},
                te_model_options={"dtype": dtype},
            )
        finally:
            mm.unet_manual_cast = original_cast
        state.update(model=model, clip=clip, vae=vae, dtype=dtype, force=bool(request.get("force_compute")))
        base = model.model
        return {
            "load_s": time.perf_counter() - start,
            "unet_dtype": str(base.get_dtype()),
            "manual_cast": str(base.manual_cast_dtype),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        }

    def compute_dtype() -> Any:
        if state["force"]:
            return state["dtype"]
        return state["model"].model.manual_cast_dtype or state["dtype"]

    def run(request: dict[str, Any]) -> dict[str, Any]:
        inputs, what = state["inputs"], request["what"]
        dtype = compute_dtype()
        with torch.no_grad():
            start, start_cpu = time.perf_counter(), time.process_time()
            if what == "unet":
                x = inputs["x"].to(dtype)
                timesteps = inputs["timestep"].float().expand(x.shape[0])
                out = state["model"].model.diffusion_model(x, timesteps, inputs["context"].to(dtype))
            elif what == "clip":
                encoder = state["clip"].cond_stage_model.clip_l.transformer
                text_dtype = state["dtype"] if state["force"] else torch.float32
                out = encoder.text_model(inputs["tokens"], dtype=text_dtype)[0]
            elif what == "vae":
                out = state["vae"].first_stage_model.decode(inputs["latents"] / 0.18215)
            else:
                raise ValueError(f"unknown run {what!r}")
            wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
        if request.get("save"):
            torch.save(out.float().contiguous(), request["save"])
        return {"wall": wall, "cpu": cpu}

    for line in sys.stdin:
        request = json.loads(line)
        try:
            if request["op"] == "exit":
                protocol.write(json.dumps({"ok": True}) + "\n")
                break
            if request["op"] == "load":
                reply = load(request)
            elif request["op"] == "inputs":
                state["inputs"] = torch.load(request["path"])
                reply = {"ok": True}
            elif request["op"] == "run":
                reply = run(request)
            else:
                raise ValueError(f"unknown op {request['op']!r}")
        except Exception as error:  # answered, so the benchmark notes it and goes on
            reply = {"error": f"{type(error).__name__}: {error}"}
        protocol.write(json.dumps(reply) + "\n")


if __name__ == "__main__":
    main()
