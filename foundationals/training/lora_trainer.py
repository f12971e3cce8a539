"""Train a LoRA on a Stable Diffusion model (SD1.5, SDXL) without touching its weights; save it in kohya format.

`LoraTrainer` injects fluxion `LinearLora`/`Conv2dLora` adapters (through `LoraAdapter`) on the chosen
UNet (and optionally text-encoder) layers, freezes everything else, and trains the adapters on the
noise-prediction loss: clean latents `x0` are noised to a random training timestep `t` of the model's
schedule (`cumulative_alphas`), `x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps`, and the UNet's output is
regressed (MSE) on `eps`, or on `v = sqrt(a_t) eps - sqrt(1 - a_t) x0` for v-prediction models.

Every random draw has its own `torch.Generator` seeded from the run's seed (LoRA init, shuffling,
timesteps, noise), all on the CPU, so a run is reproducible and a checkpoint (LoRA weights, AdamW state,
generator states, the rest of the epoch's batch order, the step) resumes it exactly. Leaving the trainer
(`with LoraTrainer(...) as trainer:`) ejects the adapters: the model is as it was, bit for bit.

The file written by `save_lora` uses kohya's names (`lora_unet_*`, `lora_te_*` / `lora_te1_*` /
`lora_te2_*`; diffusers module names for SD1.5, original LDM names for SDXL, as sd-scripts writes them),
with `.alpha` tensors and `ss_*` metadata: ComfyUI, diffusers' `load_lora_weights` and our
`SDLoraManager` load it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ...fluxion import layers as fl
from ...fluxion.adapters.lora import Conv2dLora, LinearLora, Lora, LoraAdapter
from ...fluxion.utils import save_to_safetensors, tensor_to_image
from ..clip.prompt_weighting import tokenize_prompt
from ..clip.text_encoder import TEXT_CONTEXT, CLIPTextHiddenState
from ..clip.tokenizer import CLIPTokenizer
from ..formats.lora import TEXT_ENCODER, TEXT_ENCODER_2, UNET, flat, unet_module_pairs
from ..latent_diffusion.adapters.lora import SDLoraManager, text_encoder_lora_module_map, unet_lora_module_map
from ..latent_diffusion.solvers.solver import PredictionType, SolverParams, cumulative_alphas
from ..latent_diffusion.stable_diffusion import StableDiffusion
from ..latent_diffusion.unet import CrossAttentionBlock2d, ResidualBlock
from .config import LoraOptions, SamplingOptions, TrainingOptions
from .dataset import TrainingExample, epoch_batches

LORA_NAME = "fluxion_training"
CHECKPOINT_FORMAT = 1
_UNET_CONTEXTS = ("diffusion", "cross_attention_block", "sdxl")
_SAVE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class TrainingError(ValueError):
    """Training cannot start or resume (bad targets, sizes the model can't take, a mismatched checkpoint)."""


@dataclass(frozen=True)
class TrainingProgress:
    """Reported after every optimizer step."""

    step: int
    total_steps: int
    loss: float
    samples: tuple[Path, ...] = ()
    checkpoint: Path | None = None  # the training checkpoint saved at this step, if one was


ProgressCallback = Callable[[TrainingProgress], None]


@dataclass
class _Target:
    component: str
    module: str  # canonical (diffusers / transformers) module path
    kohya_name: str
    layer: fl.Linear | fl.Conv2d
    root: fl.Chain
    lora: Lora[Any] = field(init=False)
    adapter: LoraAdapter | None = None


def kohya_names(model: StableDiffusion) -> dict[tuple[str, str], str]:
    """(component, canonical module) → kohya name for every Linear/Conv2d sd-scripts could train."""
    manager = SDLoraManager.for_models(model.unet, model.text_encoder, model.text_encoder_2)
    names: dict[tuple[str, str], str] = {}
    for diffusers, ldm in unet_module_pairs(manager.namespace.unet):
        names[(UNET, diffusers)] = f"lora_unet_{flat(ldm if model.is_sdxl else diffusers)}"
    prefixes = (
        {TEXT_ENCODER: "lora_te1_", TEXT_ENCODER_2: "lora_te2_"}
        if model.is_sdxl
        else {TEXT_ENCODER: "lora_te_"}
    )
    for component, prefix in prefixes.items():
        encoder = model.text_encoder if component == TEXT_ENCODER else model.text_encoder_2
        assert encoder is not None
        for module in text_encoder_lora_module_map(encoder):
            names[(component, module)] = f"{prefix}{flat(module)}"
    return names


def _matches(module: str, targets: Sequence[str]) -> bool:
    return any(module == target or module.endswith("." + target) for target in targets)


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    if dtype is None or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=dtype)


def _checkpointed(forward: Callable[..., Any], *args: Any) -> Any:
    return checkpoint(forward, *args, use_reentrant=False)


class LoraTrainer:
    """Trains one LoRA on `model` over `examples`; use as a context manager (adapters out on exit)."""

    def __init__(
        self,
        model: StableDiffusion,
        examples: Sequence[TrainingExample],
        lora: LoraOptions | None = None,
        training: TrainingOptions | None = None,
        prediction_type: PredictionType | None = None,
        sampling: SamplingOptions | None = None,
    ) -> None:
        if not examples:
            raise TrainingError("no training examples")
        self.model = model
        self.examples = list(examples)
        self.lora_options = lora or LoraOptions()
        self.options = training or TrainingOptions()
        self.sampling = sampling
        self.prediction_type = prediction_type or model.prediction_type
        self.device = model.device
        # the model's training noise schedule (zero terminal SNR for models trained on one)
        self.alphas_cumprod = cumulative_alphas(SolverParams(rescale_betas_zero_snr=model.zero_terminal_snr))
        self._check_sizes()
        self.targets = self._find_targets()
        self.step = 0
        self.losses: list[float] = []
        self._plan: list[list[int]] = []
        seed = self.options.seed
        self.generators = {
            purpose: torch.Generator("cpu").manual_seed(seed + offset)
            for offset, purpose in enumerate(("init", "shuffle", "timesteps", "noise"))
        }
        self._active = False
        self._undo: list[Callable[[], None]] = []
        self.optimizer: torch.optim.Optimizer | None = None
        self.scaler: Any = None

    # -- Setup ------------------------------------------------------------------------------------

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The autocast dtype on CUDA (bf16/fp16 when asked, or the weights' dtype when they are half)."""
        if self.device.type != "cuda":
            return None
        chosen = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.options.mixed_precision)
        weights = self.model.unet.dtype
        return chosen or (weights if weights in (torch.float16, torch.bfloat16) else None)

    def _check_sizes(self) -> None:
        unet_levels = len(self.model.unet.config.block_channels) - 1
        multiple = self.model.autoencoder.config.downscale_factor * 2**unet_levels
        for example in self.examples:
            height, width = example.size
            if height % multiple or width % multiple:
                raise TrainingError(
                    f"{example.source or 'an image'}: size {height}x{width} is not a multiple of {multiple} "
                    f"(this model needs multiples of {multiple}; set the bucket step to one)"
                )

    def _find_targets(self) -> list[_Target]:
        names = kohya_names(self.model)
        roots: list[tuple[str, fl.Chain, dict[str, str], Sequence[str]]] = [
            (UNET, self.model.unet, unet_lora_module_map(self.model.unet), self.lora_options.unet_targets)
        ]
        if self.lora_options.text_encoder:
            encoders = [(TEXT_ENCODER, self.model.text_encoder), (TEXT_ENCODER_2, self.model.text_encoder_2)]
            for component, encoder in encoders:
                if encoder is not None:
                    module_map = text_encoder_lora_module_map(encoder)
                    roots.append((component, encoder, module_map, self.lora_options.text_encoder_targets))
        targets = []
        for component, root, module_map, wanted in roots:
            for module, ours in sorted(module_map.items()):
                if (component, module) not in names or not _matches(module, wanted):
                    continue
                layer = root.get_submodule(ours)
                if isinstance(layer, (fl.Linear, fl.Conv2d)):
                    targets.append(_Target(component, module, names[(component, module)], layer, root))
        if not targets:
            raise TrainingError(
                f"no layer matches the LoRA targets {list(self.lora_options.unet_targets)}"
                + (
                    f" / {list(self.lora_options.text_encoder_targets)}"
                    if self.lora_options.text_encoder
                    else ""
                )
                + " (names such as to_q, to_k, to_v, to_out.0, proj_in, ff.net.2, q_proj, out_proj)"
            )
        return targets

    def _make_lora(self, layer: fl.Linear | fl.Conv2d) -> Lora[Any]:
        rank, scale = self.lora_options.rank, self.lora_options.alpha / self.lora_options.rank
        device = layer.weight.device
        if isinstance(layer, fl.Linear):
            return LinearLora(LORA_NAME, layer.in_features, layer.out_features, rank, scale, device=device)
        return Conv2dLora(
            LORA_NAME,
            layer.in_channels,
            layer.out_channels,
            rank,
            scale,
            kernel_size=layer.kernel_size,  # type: ignore[arg-type]
            stride=layer.stride,  # type: ignore[arg-type]
            padding=layer.padding,  # type: ignore[arg-type]
            device=device,
        )

    def __enter__(self) -> LoraTrainer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def start(self) -> None:
        """Inject the adapters (fresh LoRAs), freeze the base weights, cache latents and text, build AdamW."""
        if self._active:
            return
        self._active = True
        try:
            self._prepare()
        except BaseException:
            self.close()
            raise

    def _prepare(self) -> None:
        models = [self.model.unet, self.model.autoencoder, self.model.text_encoder, self.model.text_encoder_2]
        flags = [(p, p.requires_grad) for m in models if m is not None for p in m.parameters()]
        self._undo.append(partial(_restore_flags, flags))
        for parameter, _ in flags:
            parameter.requires_grad_(False)
        saved = {}
        for name in _UNET_CONTEXTS:
            context = self.model.unet.provider.get_context(name)
            if context is not None:
                saved[name] = (context, dict(context))
        self._undo.append(partial(_restore_contexts, saved))
        init = self.generators["init"]
        for target in self.targets:
            target.lora = self._make_lora(target.layer)
            with torch.no_grad():
                down = target.lora.down.weight
                down.copy_(torch.randn(down.shape, generator=init) / self.lora_options.rank)
                torch.nn.init.zeros_(target.lora.up.weight)
            parent = target.root.find_parent(target.layer)
            if parent is None:
                raise TrainingError(f"{target.module} is not in the model tree")
            target.adapter = LoraAdapter(target.layer, target.lora).inject(parent)
            self._undo.append(target.adapter.eject)
        if self.options.gradient_checkpointing and self.device.type == "cuda":
            self._enable_gradient_checkpointing()
        self._cache_inputs()
        unet_parameters = [p for t in self.targets if t.component == UNET for p in t.lora.parameters()]
        text_parameters = [p for t in self.targets if t.component != UNET for p in t.lora.parameters()]
        groups = [{"params": unet_parameters, "lr": self.options.learning_rate}] if unet_parameters else []
        if text_parameters:
            groups.append({"params": text_parameters, "lr": self.options.text_encoder_learning_rate})
        self.optimizer = torch.optim.AdamW(groups, weight_decay=self.options.weight_decay)
        if self.autocast_dtype == torch.float16:
            self.scaler = torch.amp.GradScaler("cuda")

    def _enable_gradient_checkpointing(self) -> None:
        for module in self.model.unet.modules():
            if isinstance(module, (ResidualBlock, CrossAttentionBlock2d)):
                module.__dict__["forward"] = partial(_checkpointed, type(module).forward.__get__(module))
                self._undo.append(partial(module.__dict__.pop, "forward", None))

    def close(self) -> None:
        """Eject the adapters and restore the model's flags and contexts (the trained weights stay readable)."""
        while self._undo:
            self._undo.pop()()
        self._active = False

    # -- Inputs -----------------------------------------------------------------------------------

    def _cache_inputs(self) -> None:
        sd = self.model
        self._latents = []
        for example in self.examples:
            image = example.image[None].to(device=self.device, dtype=sd.autoencoder.dtype)
            self._latents.append(sd.encode_image(image).cpu())
        self._text_encoders = self._text_views()
        self._text_cache: dict[str, tuple[Tensor, Tensor | None]] = {}
        if not self.trains_text_encoder:
            with torch.no_grad(), _autocast(self.device, self.autocast_dtype):
                for caption in sorted({example.caption for example in self.examples}):
                    hidden, pooled = self._encode([caption])
                    self._text_cache[caption] = (
                        hidden.float().cpu(),
                        None if pooled is None else pooled.float().cpu(),
                    )

    @property
    def trains_text_encoder(self) -> bool:
        return any(target.component != UNET for target in self.targets)

    def _text_views(self) -> list[tuple[CLIPTextHiddenState, CLIPTokenizer]]:
        """Hidden-state views of the (adapted) text encoders, as SD1.5 / SDXL condition on them."""
        sd = self.model
        if sd.text_encoder_2 is None:
            return [(CLIPTextHiddenState(sd.text_encoder, layer=-1, final_norm=True), _tokenizer("clip_l"))]
        return [
            (CLIPTextHiddenState(sd.text_encoder, layer=-2, final_norm=False), _tokenizer("clip_l")),
            (
                CLIPTextHiddenState(sd.text_encoder_2, layer=-2, final_norm=False, pooled=True),
                _tokenizer("openclip_bigg"),
            ),
        ]

    def _encode(self, captions: Sequence[str]) -> tuple[Tensor, Tensor | None]:
        """Text embeddings (B, 77, D) of the first 75 tokens of each caption, and SDXL's pooled embedding."""
        hidden_states, pooled = [], None
        for view, tokenizer in self._text_encoders:
            ids = torch.cat([tokenize_prompt(c, tokenizer).token_id_tensor()[:1] for c in captions])
            view.set_context(TEXT_CONTEXT, {"token_ids": None, "extra_embeddings": None})
            output = view(ids.to(self.device))
            if isinstance(output, tuple):
                output, pooled = output
            hidden_states.append(output)
        return torch.cat(hidden_states, dim=-1), pooled

    def _conditioning(self, indices: Sequence[int]) -> tuple[Tensor, Tensor | None]:
        captions = [self.examples[i].caption for i in indices]
        if self.trains_text_encoder:
            return self._encode(captions)
        hidden = torch.cat([self._text_cache[c][0] for c in captions]).to(self.device)
        pooled = None
        if self.model.is_sdxl:
            pooled = torch.cat([self._text_cache[c][1] for c in captions]).to(self.device)  # type: ignore[misc]
        return hidden, pooled

    def _time_ids(self, indices: Sequence[int]) -> Tensor:
        rows = []
        for index in indices:
            example = self.examples[index]
            rows.append([*example.original_size, *example.crop_top_left, *example.size])
        return torch.tensor(rows, dtype=torch.float32, device=self.device)

    # -- Training ---------------------------------------------------------------------------------

    def _next_batch(self) -> list[int]:
        if not self._plan:
            self._plan = epoch_batches(self.examples, self.options.batch_size, self.generators["shuffle"])
        return self._plan.pop(0)

    def loss(self, indices: Sequence[int]) -> Tensor:
        """The noise-prediction loss of one batch of examples (draws timesteps and noise)."""
        unet = self.model.unet
        x0 = torch.cat([self._latents[i] for i in indices])
        noise = torch.randn(x0.shape, generator=self.generators["noise"])
        timesteps = torch.randint(
            0, len(self.alphas_cumprod), (len(indices),), generator=self.generators["timesteps"]
        )
        alpha = self.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        noisy = alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise
        if self.prediction_type == PredictionType.V_PREDICTION:
            target = alpha.sqrt() * noise - (1 - alpha).sqrt() * x0
        else:
            target = noise
        with _autocast(self.device, self.autocast_dtype):
            text, pooled = self._conditioning(indices)
            dtype = unet.dtype if self.autocast_dtype is None else self.autocast_dtype
            unet.set_timestep(timesteps.to(self.device))
            unet.set_clip_text_embedding(text.to(dtype))
            if self.model.is_sdxl:
                assert pooled is not None
                unet.set_pooled_text_embedding(pooled.to(dtype))
                unet.set_time_ids(self._time_ids(indices))
            prediction = unet(noisy.to(self.device, dtype))
        return F.mse_loss(prediction.float(), target.to(self.device))

    def train_step(self) -> float:
        """One optimizer step over `gradient_accumulation` batches; returns their mean loss."""
        if not self._active or self.optimizer is None:
            raise TrainingError("call start() (or use `with LoraTrainer(...)`) before training")
        accumulation = self.options.gradient_accumulation
        total = 0.0
        for _ in range(accumulation):
            loss = self.loss(self._next_batch()) / accumulation
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            total += float(loss.detach())
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.losses.append(total)
        return total

    def train(
        self,
        callback: ProgressCallback | None = None,
        checkpoint_every: int = 0,
        checkpoint_folder: str | Path | None = None,
    ) -> list[float]:
        """Run to `steps` optimizer steps (from wherever a resumed run stands); returns every step's loss."""
        total = self.options.steps
        while self.step < total:
            loss = self.train_step()
            samples: tuple[Path, ...] = ()
            if self.sampling is not None and self.sampling.every and self.step % self.sampling.every == 0:
                samples = tuple(self.write_samples(self.sampling.folder))
            saved = None
            if checkpoint_every and checkpoint_folder is not None and self.step % checkpoint_every == 0:
                saved = self.save_checkpoint(Path(checkpoint_folder) / f"checkpoint-{self.step:06d}.pt")
            if callback is not None:
                callback(TrainingProgress(self.step, total, loss, samples, saved))
        return list(self.losses)

    def write_samples(self, folder: str | Path) -> list[Path]:
        """Draw the sampling prompts with the LoRA as trained so far; PNGs named by step."""
        assert self.sampling is not None
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        height, width = self.examples[0].size
        written = []
        with torch.no_grad(), _autocast(self.device, self.autocast_dtype):
            for index, prompt in enumerate(self.sampling.prompts):
                image = self.model.text_to_image(
                    prompt,
                    width=width,
                    height=height,
                    steps=self.sampling.steps,
                    guidance_scale=self.sampling.guidance_scale,
                    seed=self.sampling.seed,
                )
                path = folder / f"sample-{self.step:06d}-{index}.png"
                tensor_to_image(image[:1].float().cpu()).save(path)
                written.append(path)
        return written

    # -- Checkpoints ------------------------------------------------------------------------------

    def _fingerprint(self) -> dict[str, Any]:
        return {
            "targets": [t.kohya_name for t in self.targets],
            "rank": self.lora_options.rank,
            "examples": len(self.examples),
            "batch_size": self.options.batch_size,
        }

    def save_checkpoint(self, path: str | Path) -> Path:
        """Write step, LoRA weights, AdamW state, generator states and the rest of the epoch's batch order."""
        assert self.optimizer is not None
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "format": CHECKPOINT_FORMAT,
            "fingerprint": json.dumps(self._fingerprint()),
            "step": self.step,
            "losses": list(self.losses),
            "lora": {name: tensor.detach().clone() for name, tensor in self._trained_tensors().items()},
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "generators": {name: g.get_state() for name, g in self.generators.items()},
            "plan": [list(batch) for batch in self._plan],
        }
        temporary = path.with_suffix(path.suffix + ".partial")
        torch.save(state, temporary)
        temporary.replace(path)
        return path

    def load_checkpoint(self, path: str | Path) -> None:
        """Continue from a checkpoint of the same setup (targets, rank, dataset size, batch size)."""
        if not self._active or self.optimizer is None:
            raise TrainingError("call start() before load_checkpoint()")
        path = Path(path)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise TrainingError(f"{path}: not a training checkpoint ({error})") from error
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise TrainingError(f"{path}: not a Fluxion LoRA training checkpoint")
        saved, current = json.loads(state["fingerprint"]), self._fingerprint()
        if saved != current:
            differing = sorted(key for key in current if saved.get(key) != current[key])
            raise TrainingError(f"{path}: was made with other settings ({', '.join(differing)} differ)")
        tensors = self._trained_tensors()
        with torch.no_grad():
            for name, tensor in state["lora"].items():
                tensors[name].copy_(tensor)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        for name, generator in self.generators.items():
            generator.set_state(state["generators"][name])
        self._plan = [list(batch) for batch in state["plan"]]
        self.step = int(state["step"])
        self.losses = [float(loss) for loss in state["losses"]]

    def _trained_tensors(self) -> dict[str, Tensor]:
        tensors = {}
        for target in self.targets:
            tensors[f"{target.kohya_name}.lora_down.weight"] = target.lora.down.weight
            tensors[f"{target.kohya_name}.lora_up.weight"] = target.lora.up.weight
        return tensors

    # -- Output -----------------------------------------------------------------------------------

    def lora_state_dict(self, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
        """The trained LoRA in kohya layout: `<name>.lora_down.weight`, `.lora_up.weight`, `.alpha`."""
        state = {}
        for name, tensor in self._trained_tensors().items():
            state[name] = tensor.detach().to(device="cpu", dtype=dtype).contiguous()
        for target in self.targets:
            state[f"{target.kohya_name}.alpha"] = torch.tensor(float(self.lora_options.alpha), dtype=dtype)
        return state

    def metadata(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """kohya's `ss_*` keys (what ComfyUI, A1111 and civitai read) and our `fluxion_*` keys."""
        lora, options = self.lora_options, self.options
        sizes = sorted({example.size for example in self.examples})
        text = self.trains_text_encoder
        metadata = {
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(lora.rank),
            "ss_network_alpha": str(float(lora.alpha)),
            "ss_base_model_version": "sdxl_base_v1-0" if self.model.is_sdxl else "sd_v1",
            "ss_v2": "False",
            "ss_steps": str(self.step),
            "ss_max_train_steps": str(options.steps),
            "ss_learning_rate": str(options.learning_rate),
            "ss_unet_lr": str(options.learning_rate),
            "ss_text_encoder_lr": str(options.text_encoder_learning_rate if text else 0.0),
            "ss_network_train_unet_only": str(not text),
            "ss_batch_size_per_device": str(options.batch_size),
            "ss_gradient_accumulation_steps": str(options.gradient_accumulation),
            "ss_mixed_precision": options.mixed_precision,
            "ss_gradient_checkpointing": str(options.gradient_checkpointing),
            "ss_optimizer": "torch.optim.AdamW",
            "ss_seed": str(options.seed),
            "ss_num_train_images": str(len(self.examples)),
            "ss_resolution": str(max(sizes, key=lambda s: s[0] * s[1])),
            "ss_bucket_info": json.dumps({"buckets": [list(size) for size in sizes]}),
            "fluxion_trainer": "ComfyUI-Fluxion LoraTrainer",
            "fluxion_prediction_type": self.prediction_type.value,
            "fluxion_unet_targets": json.dumps(list(lora.unet_targets)),
            "fluxion_text_encoder_targets": json.dumps(list(lora.text_encoder_targets) if text else []),
            "fluxion_layers": str(len(self.targets)),
            "fluxion_final_loss": f"{self.losses[-1]:.6g}" if self.losses else "",
        }
        metadata.update(extra or {})
        return metadata

    def save_lora(
        self,
        path: str | Path,
        dtype: torch.dtype | str = torch.float16,
        extra_metadata: dict[str, str] | None = None,
    ) -> Path:
        """Write the kohya-format `.safetensors` LoRA (folders created)."""
        if isinstance(dtype, str):
            if dtype not in _SAVE_DTYPES:
                raise TrainingError(f"unknown save dtype {dtype!r}; choose one of {', '.join(_SAVE_DTYPES)}")
            dtype = _SAVE_DTYPES[dtype]
        path = Path(path)
        if path.suffix != ".safetensors":
            raise TrainingError(f"{path}: the LoRA file must end in .safetensors")
        path.parent.mkdir(parents=True, exist_ok=True)
        save_to_safetensors(path, self.lora_state_dict(dtype), metadata=self.metadata(extra_metadata))
        return path


def _restore_flags(flags: list[tuple[torch.nn.Parameter, bool]]) -> None:
    for parameter, flag in flags:
        parameter.requires_grad_(flag)


def _restore_contexts(saved: dict[str, tuple[dict[str, Any], dict[str, Any]]]) -> None:
    for context, values in saved.values():
        context.clear()
        context.update(values)


_TOKENIZERS: dict[str, CLIPTokenizer] = {}


def _tokenizer(preset: str) -> CLIPTokenizer:
    if preset not in _TOKENIZERS:
        _TOKENIZERS[preset] = CLIPTokenizer.from_preset(preset)
    return _TOKENIZERS[preset]


def train_lora(
    model: StableDiffusion,
    examples: Sequence[TrainingExample],
    output: str | Path,
    lora: LoraOptions | None = None,
    training: TrainingOptions | None = None,
    callback: ProgressCallback | None = None,
    checkpoint_every: int = 0,
    checkpoint_folder: str | Path | None = None,
    resume: str | Path | None = None,
    sampling: SamplingOptions | None = None,
    prediction_type: PredictionType | None = None,
    save_dtype: torch.dtype | str = torch.float16,
) -> tuple[Path, list[float]]:
    """Train a LoRA on `model` (left unchanged) and write it to `output`; returns the path and the losses."""
    with LoraTrainer(model, examples, lora, training, prediction_type, sampling) as trainer:
        if resume:
            trainer.load_checkpoint(resume)
        losses = trainer.train(callback, checkpoint_every, checkpoint_folder)
        return trainer.save_lora(output, save_dtype), losses


__all__ = [
    "LoraTrainer",
    "ProgressCallback",
    "TrainingError",
    "TrainingProgress",
    "kohya_names",
    "train_lora",
]
