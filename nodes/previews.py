"""Step previews of the predicted clean latents (x0), as KSampler shows them.

After each UNet prediction of a run, `X0Preview` turns the model input and its prediction into the predicted
clean latents: the guided prediction (negative + cfg x (positive - negative)) read as noise (epsilon) or
velocity at the step's noise level. The progress bar shows that through the host's previewer (`host.preview_decoder`:
ComfyUI's --preview-method when hosted, none headless unless asked). Without a previewer nothing is computed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image
from torch import Tensor

from ..foundationals.latent_diffusion.solvers import PredictionType, Solver
from .host import preview_decoder


class X0Preview:
    """Keeps the latest predicted x0 of a run and makes its preview image on demand."""

    def __init__(
        self, solver: Solver, guidance_scale: float, guided: bool, decode: Callable[[Tensor], Image.Image]
    ) -> None:
        self.solver = solver
        self.guidance_scale = guidance_scale
        self.guided = guided
        self.decode = decode
        self.step: int | None = None
        self.x0: Tensor | None = None
        self._alphas: Tensor | None = None

    def on_step(self, step: int) -> None:
        self.step = step

    def on_prediction(self, model_input: Tensor, prediction: Tensor) -> None:
        if self.step is None:
            return
        x, prediction = model_input[:, : prediction.shape[1]].float(), prediction.float()
        if self.guided:
            unconditional, conditional = prediction.chunk(2)
            prediction = unconditional + self.guidance_scale * (conditional - unconditional)
            x = x.chunk(2)[0]
        alpha_bar = self._alpha_bar(self.solver.timesteps[self.step], x.device)
        signal, noise = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        if self.solver.params.prediction_type == PredictionType.V_PREDICTION:
            self.x0 = signal * x - noise * prediction
        else:  # epsilon: the model input is the variance-preserving x_t (sigma solvers scale it so)
            self.x0 = (x - noise * prediction) / signal

    def _alpha_bar(self, timestep: Tensor, device: torch.device) -> Tensor:
        """The cumulative alpha at a (possibly fractional) timestep, interpolated on the device."""
        if self._alphas is None or self._alphas.device != device:
            self._alphas = self.solver.alphas_cumprod.to(device=device, dtype=torch.float32)
        table = self._alphas
        t = timestep.to(device=device, dtype=torch.float32).reshape(()).clamp(0, len(table) - 1)
        low = t.floor()
        high = (low + 1).clamp(max=len(table) - 1)
        return table[low.long()] + (t - low) * (table[high.long()] - table[low.long()])

    def image(self) -> Image.Image | None:
        """The preview of the latest prediction (None before the first)."""
        return None if self.x0 is None else self.decode(self.x0)


def x0_preview(solver: Solver, guidance_scale: float, sdxl: bool) -> X0Preview | None:
    """An `X0Preview` for a run with this solver and guidance, or None when the host shows no previews."""
    decode = preview_decoder(sdxl)
    if decode is None:
        return None
    return X0Preview(solver, guidance_scale, guidance_scale > 1.0, decode)
