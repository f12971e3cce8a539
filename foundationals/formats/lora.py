"""LoRA files (kohya/A1111, LyCORIS, diffusers, peft) → `LoraWeights` in one canonical namespace.

The canonical namespace is diffusers' module path for the UNet (`down_blocks.0.attentions.0.
transformer_blocks.0.attn1.to_q`) and transformers' module path for the text encoders
(`text_model.encoder.layers.0.self_attn.q_proj`), each tagged with its component (`unet`,
`text_encoder`, `text_encoder_2`). kohya names flatten module paths with `_`, so they are
resolved against the real module list of a base-model layout, never by guessing.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

UNET, TEXT_ENCODER, TEXT_ENCODER_2 = "unet", "text_encoder", "text_encoder_2"
COMPONENTS = (UNET, TEXT_ENCODER, TEXT_ENCODER_2)


# -- Base-model layouts: where the LoRA-able layers are -------------------------------------------


@dataclass(frozen=True)
class UNetLayout:
    """The block structure of an SD-family UNet, enough to list its Linear/Conv2d modules."""

    block_channels: tuple[int, ...]
    transformer_depths: tuple[int, ...]  # per down block; 0 = no attention in that block
    mid_transformer_depth: int
    layers_per_block: int = 2
    has_add_embedding: bool = False


@dataclass(frozen=True)
class LoraNamespace:
    """A base-model family: its UNet layout and its text encoders' layer counts."""

    name: str
    unet: UNetLayout
    text_encoder_layers: Mapping[str, int]
    projected_text_encoders: tuple[str, ...] = ()  # text encoders with a `text_projection`


SD15 = LoraNamespace(
    "SD1.5",
    UNetLayout((320, 640, 1280, 1280), (1, 1, 1, 0), 1),
    {TEXT_ENCODER: 12},
)
SDXL = LoraNamespace(
    "SDXL",
    UNetLayout((320, 640, 1280), (0, 2, 10), 10, has_add_embedding=True),
    {TEXT_ENCODER: 12, TEXT_ENCODER_2: 32},
    projected_text_encoders=(TEXT_ENCODER_2,),
)
KNOWN_NAMESPACES = (SD15, SDXL)

# LDM/SGM ResNet sub-layer → diffusers ResnetBlock2D sub-layer.
LDM_RESNET_LAYERS = {
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
# LDM/SGM top-level layers → diffusers.
LDM_TOP_LAYERS = {
    "input_blocks.0.0": "conv_in",
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
    "out.2": "conv_out",
}
TRANSFORMER_BLOCK_LAYERS = (
    "attn1.to_q",
    "attn1.to_k",
    "attn1.to_v",
    "attn1.to_out.0",
    "attn2.to_q",
    "attn2.to_k",
    "attn2.to_v",
    "attn2.to_out.0",
    "ff.net.0.proj",
    "ff.net.2",
)
CLIP_LAYER_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")
CLIP_MLP_MODULES = ("mlp.fc1", "mlp.fc2")


def _resnet(diffusers: str, ldm: str, shortcut: bool) -> Iterator[tuple[str, str]]:
    for ldm_layer, diffusers_layer in LDM_RESNET_LAYERS.items():
        if diffusers_layer != "conv_shortcut" or shortcut:
            yield f"{diffusers}.{diffusers_layer}", f"{ldm}.{ldm_layer}"


def _transformer(diffusers: str, ldm: str, depth: int) -> Iterator[tuple[str, str]]:
    for layer in ("proj_in", "proj_out"):
        yield f"{diffusers}.{layer}", f"{ldm}.{layer}"
    for index in range(depth):
        for layer in TRANSFORMER_BLOCK_LAYERS:
            yield (
                f"{diffusers}.transformer_blocks.{index}.{layer}",
                f"{ldm}.transformer_blocks.{index}.{layer}",
            )


def unet_module_pairs(layout: UNetLayout) -> Iterator[tuple[str, str]]:
    """(diffusers module path, LDM module path) for every Linear/Conv2d of a UNet layout.

    The block correspondence: LDM `input_blocks.N` counts conv_in, then per down block its
    (resnet[, attention]) pairs and its downsampler; `middle_block.0/1/2` is resnet, attention,
    resnet; `output_blocks.N` counts per up block its (resnet[, attention][, upsampler]) triples.
    """
    for ldm, diffusers in LDM_TOP_LAYERS.items():
        if diffusers.startswith("add_embedding") and not layout.has_add_embedding:
            continue
        yield diffusers, ldm
    channels, depths, per_block = layout.block_channels, layout.transformer_depths, layout.layers_per_block
    last = len(channels) - 1
    ldm_index = 1
    in_channels = channels[0]
    for block, (out_channels, depth) in enumerate(zip(channels, depths)):
        for layer in range(per_block):
            prefix = f"down_blocks.{block}"
            yield from _resnet(
                f"{prefix}.resnets.{layer}", f"input_blocks.{ldm_index}.0", in_channels != out_channels
            )
            in_channels = out_channels
            if depth:
                yield from _transformer(f"{prefix}.attentions.{layer}", f"input_blocks.{ldm_index}.1", depth)
            ldm_index += 1
        if block != last:
            yield f"down_blocks.{block}.downsamplers.0.conv", f"input_blocks.{ldm_index}.0.op"
            ldm_index += 1
    yield from _resnet("mid_block.resnets.0", "middle_block.0", False)
    yield from _transformer("mid_block.attentions.0", "middle_block.1", layout.mid_transformer_depth)
    yield from _resnet("mid_block.resnets.1", "middle_block.2", False)
    ldm_index = 0
    for up, depth in enumerate(reversed(depths)):
        for layer in range(per_block + 1):
            prefix = f"up_blocks.{up}"
            yield from _resnet(f"{prefix}.resnets.{layer}", f"output_blocks.{ldm_index}.0", True)
            if depth:
                yield from _transformer(f"{prefix}.attentions.{layer}", f"output_blocks.{ldm_index}.1", depth)
            if up != last and layer == per_block:
                slot = 2 if depth else 1
                yield f"{prefix}.upsamplers.0.conv", f"output_blocks.{ldm_index}.{slot}.conv"
            ldm_index += 1


def text_encoder_modules(num_layers: int, projection: bool = False) -> list[str]:
    """Every Linear of a transformers CLIPTextModel(WithProjection) with `num_layers` layers."""
    names = [
        f"text_model.encoder.layers.{index}.{module}"
        for index in range(num_layers)
        for module in CLIP_LAYER_MODULES + CLIP_MLP_MODULES
    ]
    return names + (["text_projection"] if projection else [])


def canonical_modules(namespace: LoraNamespace) -> dict[str, list[str]]:
    """The canonical module paths of every component of a base-model family."""
    modules = {UNET: [diffusers for diffusers, _ in unet_module_pairs(namespace.unet)]}
    for component, layers in namespace.text_encoder_layers.items():
        modules[component] = text_encoder_modules(layers, component in namespace.projected_text_encoders)
    return modules


# -- Normalized weights ----------------------------------------------------------------------------


@dataclass
class LoraWeights:
    """One adapted layer: method (`lora`, `loha`, `lokr`, `full`), its tensors, alpha, DoRA magnitude.

    Tensor names: lora `down`, `up`, optional `mid` (LoCon Tucker core); loha `w1_a`, `w1_b`,
    `w2_a`, `w2_b`, optional `t1`, `t2`; lokr `w1` or `w1_a`+`w1_b`, `w2` or `w2_a`+`w2_b`,
    optional `t2`; full `diff`. `dora_scale` is the DoRA magnitude (None for plain methods).
    """

    component: str
    module: str
    method: str
    tensors: dict[str, Tensor]
    alpha: float | None = None
    dora_scale: Tensor | None = None
    source: str = ""  # the key prefix in the file, for reports

    @property
    def rank(self) -> int | None:
        """The rank alpha is divided by (None where the method has no rank)."""
        t = self.tensors
        if self.method == "lora":
            return t["down"].shape[0]
        if self.method == "loha":
            return t["w1_b"].shape[0]
        if self.method == "lokr":
            if "w2_b" in t:
                return t["w2_b"].shape[0]
            if "w1_b" in t:
                return t["w1_b"].shape[0]
        return None

    @property
    def scale(self) -> float:
        """`alpha / rank`, or 1 where alpha or the rank is absent."""
        rank = self.rank
        return 1.0 if self.alpha is None or rank is None else self.alpha / rank

    @property
    def kind(self) -> str:
        """`conv` when the delta has spatial dimensions or was stored 4-D, else `linear`."""
        return "conv" if any(t.dim() == 4 for t in self.tensors.values()) else "linear"

    @property
    def down(self) -> Tensor:
        return self.tensors["down"]

    @property
    def up(self) -> Tensor:
        return self.tensors["up"]

    @property
    def mid(self) -> Tensor | None:
        return self.tensors.get("mid")

    def delta_weight(self, shape: torch.Size | tuple[int, ...]) -> Tensor:
        """ΔW in the target weight's `shape`, alpha/rank included, user strength and DoRA not."""
        return compute_delta(self.method, self.tensors, shape) * self.scale


def _tucker(core: Tensor, up: Tensor, down: Tensor) -> Tensor:
    """CP/Tucker rebuild: `sum_{a,b} up[o,a] core[a,b,h,w] down[b,i]` → (o, i, h, w)."""
    return torch.einsum("abhw,oa,bi->oihw", core, up.flatten(1), down.flatten(1))


def _loha_tucker(core: Tensor, w_a: Tensor, w_b: Tensor) -> Tensor:
    """LyCORIS LoHa Tucker factor: `w_a` is (rank, out), `w_b` is (rank, in), `core` (rank, rank, h, w)."""
    return torch.einsum("abhw,bi,ao->oihw", core, w_b, w_a)


def compute_delta(method: str, t: Mapping[str, Tensor], shape: torch.Size | tuple[int, ...]) -> Tensor:
    """The unscaled ΔW of one layer from the published formulas, reshaped to `shape`.

    LoRA: `up @ down` (Tucker: `up ×₁ mid ×₂ down`); LoHa: `(w1_a @ w1_b) ⊙ (w2_a @ w2_b)`;
    LoKr: `kron(w1, w2)` with each factor full or `a @ b`; full: `diff`.
    """
    if method == "lora":
        if "mid" in t:
            delta = _tucker(t["mid"], t["up"], t["down"])
        else:
            delta = t["up"].flatten(1) @ t["down"].flatten(1)
    elif method == "loha":
        if "t1" in t:
            first = _loha_tucker(t["t1"], t["w1_a"], t["w1_b"])
            second = _loha_tucker(t["t2"], t["w2_a"], t["w2_b"])
        else:
            first = t["w1_a"] @ t["w1_b"].flatten(1)
            second = t["w2_a"] @ t["w2_b"].flatten(1)
        delta = first * second
    elif method == "lokr":
        w1 = t["w1"] if "w1" in t else t["w1_a"] @ t["w1_b"]
        if "w2" in t:
            w2 = t["w2"]
        elif "t2" in t:
            w2 = _loha_tucker(t["t2"], t["w2_a"], t["w2_b"])
        else:
            w2 = t["w2_a"] @ t["w2_b"]
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        delta = torch.kron(w1, w2)
    elif method == "full":
        delta = t["diff"]
    else:
        raise ValueError(f"unknown LoRA method {method!r}")
    if delta.numel() != math.prod(shape):
        raise ValueError(
            f"{method} delta has {tuple(delta.shape)} elements, the layer weight is {tuple(shape)}"
        )
    return delta.reshape(shape)


# -- Key suffixes of each format -------------------------------------------------------------------

# kohya / A1111 / LyCORIS: `<prefix>_<flat module>.<suffix>`.
KOHYA_PREFIXES = {
    "lora_unet_": UNET,
    "lora_te_": TEXT_ENCODER,
    "lora_te1_": TEXT_ENCODER,
    "lora_te2_": TEXT_ENCODER_2,
}
KOHYA_SUFFIXES = {
    "lora_down.weight": ("lora", "down"),
    "lora_up.weight": ("lora", "up"),
    "lora_mid.weight": ("lora", "mid"),
    "hada_w1_a": ("loha", "w1_a"),
    "hada_w1_b": ("loha", "w1_b"),
    "hada_w2_a": ("loha", "w2_a"),
    "hada_w2_b": ("loha", "w2_b"),
    "hada_t1": ("loha", "t1"),
    "hada_t2": ("loha", "t2"),
    "lokr_w1": ("lokr", "w1"),
    "lokr_w1_a": ("lokr", "w1_a"),
    "lokr_w1_b": ("lokr", "w1_b"),
    "lokr_w2": ("lokr", "w2"),
    "lokr_w2_a": ("lokr", "w2_a"),
    "lokr_w2_b": ("lokr", "w2_b"),
    "lokr_t2": ("lokr", "t2"),
    "diff": ("full", "diff"),
}
KOHYA_EXTRAS = {"alpha", "dora_scale"}

# diffusers / peft: `<component>.<module path><suffix>`.
DIFFUSERS_PREFIXES = {
    "unet.": UNET,
    "text_encoder.": TEXT_ENCODER,
    "text_encoder_2.": TEXT_ENCODER_2,
    "base_model.model.": "",  # a bare peft save: the component comes from the module path
}
DIFFUSERS_SUFFIXES = (
    (re.compile(r"\.lora_A(?:\.[A-Za-z_][\w-]*)?\.weight$"), "down"),  # peft (optionally with adapter name)
    (re.compile(r"\.lora_B(?:\.[A-Za-z_][\w-]*)?\.weight$"), "up"),
    (re.compile(r"\.lora(?:_linear_layer)?\.down\.weight$"), "down"),  # diffusers LoRACompatible layers
    (re.compile(r"\.lora(?:_linear_layer)?\.up\.weight$"), "up"),
    (re.compile(r"\.lora_magnitude_vector(?:\.[A-Za-z_][\w-]*)?(?:\.weight)?$"), "dora_scale"),
    (re.compile(r"\.alpha$"), "alpha"),
)
# diffusers attention-processor names (`attn1.processor.to_q_lora.down.weight`) → module names.
DIFFUSERS_PROCESSOR_MODULES = {
    "to_q_lora": "to_q",
    "to_k_lora": "to_k",
    "to_v_lora": "to_v",
    "to_out_lora": "to_out.0",
}
DIFFUSERS_PROCESSOR = re.compile(
    r"\.(?:processor\.)?(to_q_lora|to_k_lora|to_v_lora|to_out_lora)\.(down|up)\.weight$"
)
# Legacy diffusers text-encoder attention names → transformers names.
DIFFUSERS_TEXT_PROCESSOR_MODULES = {
    "to_q": "q_proj",
    "to_k": "k_proj",
    "to_v": "v_proj",
    "to_out.0": "out_proj",
}


@dataclass
class LoraFile:
    """A normalized LoRA file: its weights, the keys it could not place, and what it looks like."""

    weights: list[LoraWeights]
    unmatched: list[str] = field(default_factory=list)
    format: str = ""
    namespace: str = ""  # the family its kohya/LDM names resolved against
    family_hint: str | None = None  # what the file itself says it targets, with the evidence

    @property
    def components(self) -> set[str]:
        return {weights.component for weights in self.weights}


def flat(path: str) -> str:
    """kohya's flattening of a module path: dots become underscores."""
    return path.replace(".", "_")


def kohya_name_table(namespace: LoraNamespace) -> dict[str, tuple[str, str]]:
    """kohya `lora_*` module name → (component, canonical module), for diffusers and LDM spellings."""
    table: dict[str, tuple[str, str]] = {}
    for diffusers, ldm in unet_module_pairs(namespace.unet):
        table[f"lora_unet_{flat(diffusers)}"] = (UNET, diffusers)
        table.setdefault(f"lora_unet_{flat(ldm)}", (UNET, diffusers))
    modules = canonical_modules(namespace)
    for prefix, component in KOHYA_PREFIXES.items():
        if component != UNET:
            for module in modules.get(component, []):
                table[f"{prefix}{flat(module)}"] = (component, module)
    if TEXT_ENCODER_2 not in namespace.text_encoder_layers:  # single-encoder families never say `te1`
        table = {name: place for name, place in table.items() if not name.startswith("lora_te1_")}
    return table


def _split_kohya(key: str) -> tuple[str, str] | None:
    name, _, suffix = key.partition(".")
    if not any(name.startswith(prefix) for prefix in KOHYA_PREFIXES):
        return None
    return name, suffix


def is_kohya(state_dict: Mapping[str, Tensor]) -> bool:
    """Whether keys look like kohya/A1111/LyCORIS (`lora_unet_*`, `lora_te*_*`)."""
    return any(_split_kohya(key) for key in state_dict)


def family_hint(state_dict: Mapping[str, Tensor]) -> str | None:
    """What base model the keys point at, with the evidence, e.g. `SDXL (has lora_te2_ keys)`."""
    keys = list(state_dict)
    if any(key.startswith(("lora_te2_", "text_encoder_2.")) for key in keys):
        return "SDXL (has lora_te2_/text_encoder_2 keys)"
    if any(key.startswith("lora_unet_label_emb") or "add_embedding" in key for key in keys):
        return "SDXL (has added-conditioning embedding keys)"
    for key, tensor in state_dict.items():
        is_down = key.endswith(("lora_down.weight", "lora_A.weight", "lora.down.weight"))
        if is_down and tensor.dim() >= 2 and "attn2" in key and re.search(r"attn2[._]to[._]k", key):
            width = tensor.shape[1]
            family = {768: "SD1.5", 1024: "SD2.x", 2048: "SDXL"}.get(width)
            if family:
                return f"{family} (cross-attention context width {width})"
    return None


def _assemble(
    component: str, module: str, source: str, parts: dict[str, Tensor], alpha: Tensor | float | None
) -> LoraWeights | str:
    """Group one layer's tensors into LoraWeights, or say why they don't form a known method."""
    problem = _malformed(source, parts, alpha)
    if problem is not None:
        return problem
    dora = parts.pop("dora_scale", None)
    tensors = {name.split(":")[-1]: tensor for name, tensor in parts.items()}
    methods = {name.split(":")[0] for name in parts}
    if len(methods) != 1:
        return f"{source}: mixes methods {sorted(methods)}"
    method = methods.pop()
    required = {
        "lora": [("down", "up")],
        "loha": [("w1_a", "w1_b", "w2_a", "w2_b")],
        "lokr": [("w1", "w1_a"), ("w2", "w2_a")],
        "full": [("diff",)],
    }[method]
    if method == "lokr":
        missing = [group for group in required if not any(name in tensors for name in group)]
    else:
        missing = [name for name in required[0] if name not in tensors]
    if missing:
        return f"{source}: {method} weights without {missing}"
    value = float(alpha.item()) if isinstance(alpha, Tensor) else alpha
    return LoraWeights(component, module, method, tensors, value, dora, source)


def _malformed(source: str, parts: Mapping[str, Tensor], alpha: Tensor | float | None) -> str | None:
    """Why one layer's tensors cannot be a LoRA (a factor that is no matrix or is empty, an alpha of many values)."""
    for name, tensor in parts.items():
        if name not in ("dora_scale", "full:diff") and (tensor.dim() < 2 or tensor.numel() == 0):
            role = name.split(":")[-1]
            return f"{source}: {role} has shape {tuple(tensor.shape)}, not a (non-empty) matrix or kernel"
    if isinstance(alpha, Tensor) and alpha.numel() != 1:
        return f"{source}: alpha has shape {tuple(alpha.shape)}, not one number"
    return None


def _normalize_kohya(
    state_dict: Mapping[str, Tensor], namespace: LoraNamespace
) -> tuple[list[LoraWeights], list[str]]:
    table = kohya_name_table(namespace)
    groups: dict[str, dict[str, Tensor]] = {}
    alphas: dict[str, Tensor] = {}
    unmatched: list[str] = []
    for key, tensor in state_dict.items():
        split = _split_kohya(key)
        if split is None:
            unmatched.append(key)
            continue
        name, suffix = split
        if suffix == "alpha":
            alphas[name] = tensor
        elif suffix == "dora_scale":
            groups.setdefault(name, {})["dora_scale"] = tensor
        elif suffix in KOHYA_SUFFIXES:
            method, role = KOHYA_SUFFIXES[suffix]
            groups.setdefault(name, {})[f"{method}:{role}"] = tensor
        else:
            unmatched.append(key)
    weights: list[LoraWeights] = []
    for name, parts in groups.items():
        place = table.get(name)
        if place is None:
            unmatched.extend(f"{name}.{suffix.split(':')[-1]}" for suffix in parts)
            continue
        result = _assemble(*place, name, dict(parts), alphas.pop(name, None))
        if isinstance(result, str):
            unmatched.append(result)
        else:
            weights.append(result)
    unmatched.extend(f"{name}.alpha" for name in alphas if name not in groups)
    return weights, unmatched


def _peft_alphas(metadata: Mapping[str, str] | None) -> dict[str, dict[str, object]]:
    """Per-component peft LoraConfig values that diffusers stores in the safetensors metadata."""
    if not metadata or "lora_adapter_metadata" not in metadata:
        return {}
    values = json.loads(metadata["lora_adapter_metadata"])
    configs: dict[str, dict[str, object]] = {}
    for key, value in values.items():
        component, _, name = key.partition(".")
        configs.setdefault(component, {})[name] = value
    return configs


def _pattern_value(patterns: object, module: str) -> object | None:
    if not isinstance(patterns, dict):
        return None
    for pattern, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?{pattern}", module):
            return value
    return None


def _peft_alpha(config: Mapping[str, object], module: str, rank: int) -> float | None:
    """alpha such that `alpha / rank` is peft's scaling (`lora_alpha / r`, or `/ sqrt(r)` for rsLoRA)."""
    if "lora_alpha" not in config:
        return None
    alpha = _pattern_value(config.get("alpha_pattern"), module) or config["lora_alpha"]
    r = _pattern_value(config.get("rank_pattern"), module) or config.get("r", rank)
    scaling = float(alpha) / (math.sqrt(float(r)) if config.get("use_rslora") else float(r))  # type: ignore[arg-type]
    return scaling * rank


def _diffusers_place(key: str) -> tuple[str, str, str] | None:
    """(component, canonical module, role) of a diffusers/peft key, or None."""
    prefix = next((prefix for prefix in DIFFUSERS_PREFIXES if key.startswith(prefix)), None)
    if prefix is None:
        return None
    component, rest = DIFFUSERS_PREFIXES[prefix], key[len(prefix) :]
    processor = DIFFUSERS_PROCESSOR.search(rest)
    if processor:
        module = rest[: processor.start()] + "." + DIFFUSERS_PROCESSOR_MODULES[processor.group(1)]
        role = processor.group(2)
    else:
        found = next(
            ((match, role) for pattern, role in DIFFUSERS_SUFFIXES if (match := pattern.search(rest))), None
        )
        if found is None:
            return None
        module, role = rest[: found[0].start()], found[1]
    if not component:
        component = TEXT_ENCODER if module.startswith("text_model.") else UNET
    if component != UNET:
        head, _, last = module.rpartition(".")
        if head.endswith("self_attn") and last in ("to_q", "to_k", "to_v"):
            module = f"{head}.{DIFFUSERS_TEXT_PROCESSOR_MODULES[last]}"
        elif module.endswith("self_attn.to_out.0"):
            module = module[: -len("to_out.0")] + "out_proj"
    return component, module, role


def _normalize_diffusers(
    state_dict: Mapping[str, Tensor], metadata: Mapping[str, str] | None
) -> tuple[list[LoraWeights], list[str]]:
    groups: dict[tuple[str, str], dict[str, Tensor]] = {}
    sources: dict[tuple[str, str], str] = {}
    alphas: dict[tuple[str, str], Tensor] = {}
    unmatched: list[str] = []
    for key, tensor in state_dict.items():
        place = _diffusers_place(key)
        if place is None:
            unmatched.append(key)
            continue
        component, module, role = place
        if role == "alpha":
            alphas[(component, module)] = tensor
            continue
        groups.setdefault((component, module), {})[
            "dora_scale" if role == "dora_scale" else f"lora:{role}"
        ] = tensor
        sources.setdefault((component, module), key)
    configs = _peft_alphas(metadata)
    weights: list[LoraWeights] = []
    for (component, module), parts in groups.items():
        alpha: Tensor | float | None = alphas.pop((component, module), None)
        if alpha is None and "lora:down" in parts and parts["lora:down"].dim() >= 2:
            alpha = _peft_alpha(configs.get(component, {}), module, parts["lora:down"].shape[0])
        result = _assemble(component, module, sources[(component, module)], dict(parts), alpha)
        if isinstance(result, str):
            unmatched.append(result)
        else:
            weights.append(result)
    unmatched.extend(f"{component}.{module}.alpha" for component, module in alphas)
    return weights, unmatched


def normalize_lora(
    state_dict: Mapping[str, Tensor],
    namespace: LoraNamespace | None = None,
    metadata: Mapping[str, str] | None = None,
) -> LoraFile:
    """Read any supported LoRA state dict into canonical `LoraWeights`; unplaced keys are listed.

    kohya/LyCORIS names resolve against `namespace`'s module list; by default against every
    known family, keeping the one that places the most weights.
    """
    hint = family_hint(state_dict)
    if is_kohya(state_dict):
        candidates = [namespace] if namespace is not None else list(KNOWN_NAMESPACES)
        best: tuple[list[LoraWeights], list[str], str] | None = None
        for candidate in candidates:
            weights, unmatched = _normalize_kohya(state_dict, candidate)
            if best is None or len(weights) > len(best[0]):
                best = (weights, unmatched, candidate.name)
        assert best is not None
        return LoraFile(best[0], best[1], "kohya", best[2], hint)
    weights, unmatched = _normalize_diffusers(state_dict, metadata)
    if any(".lora_A" in key or ".lora_B" in key for key in state_dict):
        kind = "peft"
    else:
        kind = "diffusers"
    return LoraFile(weights, unmatched, kind, namespace.name if namespace else "", hint)
