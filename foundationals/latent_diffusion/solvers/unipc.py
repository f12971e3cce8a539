"""UniPC (Zhao et al., 2023): a unified predictor-corrector for diffusion ODEs, in data prediction (x0) form."""

import math

import torch
from torch import Tensor

from .multistep import MultistepSolver, half_log_snr, vp_scales
from .solver import Evaluate, SolverParams, upcast


def solve_linear(matrix: list[list[float]], values: list[float]) -> list[float]:
    """The solution of a small dense linear system (Gaussian elimination with partial pivoting)."""
    size = len(values)
    rows = [[*row, value] for row, value in zip(matrix, values)]
    for column in range(size):
        pivot = max(range(column, size), key=lambda r: abs(rows[r][column]))
        rows[column], rows[pivot] = rows[pivot], rows[column]
        for row in range(column + 1, size):
            factor = rows[row][column] / rows[column][column]
            rows[row] = [a - factor * b for a, b in zip(rows[row], rows[column])]
    solution = [0.0] * size
    for row in reversed(range(size)):
        known = sum(rows[row][k] * solution[k] for k in range(row + 1, size))
        solution[row] = (rows[row][size] - known) / rows[row][row]
    return solution


class UniPC(MultistepSolver):
    """UniPC with the B(h) variant `bh1` (B(h) = h, ComfyUI's `uni_pc`) or `bh2` (B(h) = e^h - 1, `uni_pc_bh2`),
    as diffusers' `UniPCMultistepScheduler(predict_x0=True, lower_order_final=True)` of the same `order`.

    Each step first corrects the latents the previous step predicted (UniC, with this step's model output),
    then predicts the next ones (UniP); orders ramp up over the first steps and down over the last ones.
    Unlike diffusers' bh1, whose last step to sigma 0 is NaN (h = inf times a zero correction), the last step
    here returns the data prediction, as the bh2 formula does.
    """

    def __init__(
        self,
        num_inference_steps: int,
        first_inference_step: int = 0,
        params: SolverParams | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        variant: str = "bh1",
        order: int = 2,
    ) -> None:
        if variant not in ("bh1", "bh2"):
            raise ValueError(f"UniPC variant must be 'bh1' or 'bh2', got {variant!r}")
        if not 1 <= order <= 3:
            raise ValueError(f"UniPC order must lie in [1, 3], got {order}")
        self.variant, self.order = variant, order
        super().__init__(num_inference_steps, first_inference_step, params, device, dtype)

    def extra_arguments(self) -> dict[str, object]:
        return {"variant": self.variant, "order": self.order}

    def build_schedule(self) -> None:
        super().build_schedule()
        self.last: tuple[int, Tensor, int] | None = None  # (step, latents it started from, order used)

    def _coefficients(
        self, h: float, ratios: list[float], corrector: bool
    ) -> tuple[float, float, list[float]]:
        """(h phi_1, B(h), rhos) for log-SNR step `h` and the history's ratios r_k (the r = 1 of the new point
        last for the corrector)."""
        hh = -h
        h_phi_1 = math.expm1(hh)
        b_h = hh if self.variant == "bh1" else h_phi_1
        order = len(ratios) + (0 if corrector else 1)
        nodes = [*ratios, 1.0] if not corrector else ratios
        h_phi_k = h_phi_1 / hh - 1
        factorial = 1
        right: list[float] = []
        for power in range(1, order + 1):
            right.append(h_phi_k * factorial / b_h)
            factorial *= power + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        if corrector:
            if order == 1:
                return h_phi_1, b_h, [0.5]
            matrix = [[node ** (power - 1) for node in nodes] for power in range(1, order + 1)]
            return h_phi_1, b_h, solve_linear(matrix, right)
        if order == 1:
            return h_phi_1, b_h, []
        if order == 2:
            return h_phi_1, b_h, [0.5]
        matrix = [[node ** (power - 1) for node in nodes[:-1]] for power in range(1, order)]
        return h_phi_1, b_h, solve_linear(matrix, right[:-1])

    def __call__(
        self,
        x: Tensor,
        predicted_noise: Tensor,
        step: int,
        generator: torch.Generator | None = None,
        evaluate: Evaluate | None = None,
    ) -> Tensor:
        out_dtype = predicted_noise.dtype
        x = upcast(x)
        model = self.data_prediction(x, upcast(predicted_noise), step)
        previous = self.recent(step)  # data predictions at step - 1, step - 2, ...
        last = self.last
        if last is not None and previous and last[0] == step - 1:
            x = self._correct(step, x, model, previous, last[1], last[2])
        order = min(self.order, self.num_inference_steps - step, len(previous) + 1)
        self.record(step, model, keep=self.order)
        self.last = (step, x, order)
        return self._predict(step, x, model, previous, order).to(out_dtype)

    def _predict(self, step: int, x: Tensor, model: Tensor, previous: list, order: int) -> Tensor:
        """UniP of `order` from `step` to `step + 1`."""
        sigma, sigma_next = self.sigma_values[step], self.sigma_values[step + 1]
        alpha_t, sigma_t = vp_scales(sigma_next)
        _, sigma_s0 = vp_scales(sigma)
        if sigma_next == 0:
            return model  # the exact limit of every order: sigma_t = 0, alpha_t = 1, h = inf
        lambda_s0 = half_log_snr(sigma)
        h = half_log_snr(sigma_next) - lambda_s0
        ratios = [(half_log_snr(self.sigma_values[step - k]) - lambda_s0) / h for k in range(1, order)]
        h_phi_1, b_h, rhos = self._coefficients(h, ratios, corrector=False)
        x_t = (sigma_t / sigma_s0) * x - (alpha_t * h_phi_1) * model
        if rhos:
            residual = sum(rho * (past - model) / ratio for rho, past, ratio in zip(rhos, previous, ratios))
            x_t = x_t - (alpha_t * b_h) * residual
        return x_t

    def _correct(
        self, step: int, x: Tensor, model: Tensor, previous: list, start: Tensor, order: int
    ) -> Tensor:
        """UniC of `order`: the latents predicted from `start` at step - 1, corrected with this step's output."""
        sigma, sigma_prev = self.sigma_values[step], self.sigma_values[step - 1]
        alpha_t, sigma_t = vp_scales(sigma)
        _, sigma_s0 = vp_scales(sigma_prev)
        lambda_s0 = half_log_snr(sigma_prev)
        h = half_log_snr(sigma) - lambda_s0
        m0, older = previous[0], previous[1:]
        ratios = [(half_log_snr(self.sigma_values[step - 1 - k]) - lambda_s0) / h for k in range(1, order)]
        h_phi_1, b_h, rhos = self._coefficients(h, [*ratios, 1.0], corrector=True)
        x_t = (sigma_t / sigma_s0) * start - (alpha_t * h_phi_1) * m0
        residual = rhos[-1] * (model - m0)
        for rho, past, ratio in zip(rhos[:-1], older, ratios):
            residual = residual + rho * (past - m0) / ratio
        return x_t - (alpha_t * b_h) * residual


__all__ = ["UniPC"]
