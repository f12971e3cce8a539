"""Linear multistep (LMS): Adams-Bashforth steps on the probability-flow ODE in sigma, up to 4th order."""

import torch
from torch import Tensor

from .sigma_solver import SigmaSolver
from .solver import Evaluate, SolverParams, upcast


def lagrange_integral(nodes: list[float], which: int, start: float, end: float) -> float:
    """The integral from `start` to `end` of the Lagrange basis polynomial that is 1 at `nodes[which]`, 0 at the others.

    The polynomial's coefficients are built exactly (a product of linear factors), then integrated term by term.
    """
    coefficients = [1.0]  # ascending powers
    for index, node in enumerate(nodes):
        if index == which:
            continue
        scale = 1.0 / (nodes[which] - node)
        shifted = [0.0] + coefficients  # tau * p(tau)
        coefficients = [(high - node * low) * scale for high, low in zip(shifted, coefficients + [0.0])]
    return sum(c * (end ** (k + 1) - start ** (k + 1)) / (k + 1) for k, c in enumerate(coefficients))


class LMS(SigmaSolver):
    """Linear multistep on the slopes (x - denoised) / sigma of the last `order` steps of this run, as diffusers'
    `LMSDiscreteScheduler` (the coefficients integrate the Lagrange polynomial through those sigmas exactly).

    Like diffusers (and unlike ComfyUI's `lms`, which returns the denoised latents there), the last step down to
    sigma 0 is a multistep step too.
    """

    def __init__(
        self,
        num_inference_steps: int,
        first_inference_step: int = 0,
        params: SolverParams | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        order: int = 4,
    ) -> None:
        if not 1 <= order <= 4:
            raise ValueError(f"LMS order must lie in [1, 4], got {order}")
        self.order = order
        super().__init__(num_inference_steps, first_inference_step, params, device, dtype)

    def extra_arguments(self) -> dict[str, object]:
        return {"order": self.order}

    def build_schedule(self) -> None:
        super().build_schedule()
        self.slopes: list[tuple[int, Tensor]] = []  # (step, slope) of this run's last steps

    def __call__(
        self,
        x: Tensor,
        predicted_noise: Tensor,
        step: int,
        generator: torch.Generator | None = None,
        evaluate: Evaluate | None = None,
    ) -> Tensor:
        """x plus the slopes of the last steps weighted by the integrals of their Lagrange polynomials."""
        sigma = self.sigma_values[step]
        x = upcast(x)
        slope = (x - self.denoise(x, predicted_noise, sigma)) / sigma
        contiguous = []  # the slopes at step - 1, step - 2, ... made in this run
        for offset, (index, previous) in enumerate(reversed(self.slopes)):
            if index != step - 1 - offset or index < self.first_inference_step:
                break
            contiguous.append(previous)
        slopes = [slope, *contiguous][: self.order]
        self.slopes = [*self.slopes, (step, slope)][-self.order :]
        nodes = self.sigma_values[step - len(slopes) + 1 : step + 1][::-1]  # sigma_step, sigma_step-1, ...
        start, end = self.sigma_values[step], self.sigma_values[step + 1]
        for which, past in enumerate(slopes):
            x = x + lagrange_integral(nodes, which, start, end) * past
        return x.to(predicted_noise.dtype)
