"""IP-Adapter weight per block: ComfyUI_IPAdapter_plus' weight types (curves over the blocks, InstantStyle's
style / composition selections and their "precise" variants) and a free per-block list.

A "block" here is one spatial transformer (diffusers' `attentions.N` of a down/up block or the middle block),
numbered in the order the UNet runs them (down, middle, up), as ComfyUI's `transformer_index`: SD1.5 has 16
(down 0-5, middle 6, up 7-15), SDXL 11 (down 0-3, middle 4, up 5-10). Every transformer block inside a spatial
transformer gets that block's weight (diffusers' `set_ip_adapter_scale` has the same granularity).

Weight types (`weight` w, `weight_composition` c, `n` blocks, `t` a block's number; IPAdapter_plus' semantics):
- "linear": w everywhere.
- "ease in" w (0.05 + 0.95 (1 - t/n)); "ease out" w (0.05 + 0.95 t/n); "ease in-out"
  w (0.05 + 0.95 (1 - |t - n/2| / (n/2))); "reverse in-out" w (0.05 + 0.95 |t - n/2| / (n/2)).
- "weak input" / "weak middle" / "weak output": 0.2 w in the down / middle / up blocks, w elsewhere;
  "strong middle": 0.2 w in the down and up blocks.
- The named selections, every other block off (tables below, by diffusers name): "style transfer" (SDXL:
  `up_blocks.0.attentions.1`, InstantStyle's style block), "composition" (SDXL: `down_blocks.2.attentions.1`),
  "strong style transfer", "style and composition" (composition block at c), "style transfer precise" and
  "composition precise". The precise variants also swap the reference into the negative half in some blocks:
  there the positive rows attend to zero image tokens and the negative rows to the reference (style transfer
  precise: the composition blocks; composition precise: every block but them).
- `layer_weights`: "t:weight, t:weight" (block numbers or diffusers names such as `up_blocks.0.attentions.1`;
  unnamed blocks off) or a plain comma list with one weight per block; each is multiplied by w. It replaces
  the weight type, except that the precise variants keep their swap.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...model_config import UNetConfig

WEIGHT_TYPES = (
    "linear",
    "ease in",
    "ease out",
    "ease in-out",
    "reverse in-out",
    "weak input",
    "weak output",
    "weak middle",
    "strong middle",
    "style transfer",
    "composition",
    "strong style transfer",
    "style and composition",
    "style transfer precise",
    "composition precise",
)
INPUT, MIDDLE, OUTPUT = "input", "middle", "output"
CURVES = ("ease in", "ease out", "ease in-out", "reverse in-out")

# The named selections, per family: diffusers spatial-transformer name -> factor of w ("w") or of c ("c").
_SD15_STYLE = (
    "down_blocks.0.attentions.0",
    "down_blocks.0.attentions.1",
    "down_blocks.1.attentions.0",
    "down_blocks.1.attentions.1",
    "up_blocks.1.attentions.2",
    "up_blocks.2.attentions.0",
    "up_blocks.2.attentions.1",
    "up_blocks.2.attentions.2",
    "up_blocks.3.attentions.0",
    "up_blocks.3.attentions.1",
    "up_blocks.3.attentions.2",
)
_SD15_COMPOSITION = ("down_blocks.2.attentions.0", "down_blocks.2.attentions.1")
_SD15_MIDDLE_UP = ("mid_block.attentions.0", "up_blocks.1.attentions.0", "up_blocks.1.attentions.1")
_SDXL_STYLE, _SDXL_COMPOSITION = "up_blocks.0.attentions.1", "down_blocks.2.attentions.1"
_SDXL_ALL = (
    "down_blocks.1.attentions.0",
    "down_blocks.1.attentions.1",
    "down_blocks.2.attentions.0",
    "down_blocks.2.attentions.1",
    "mid_block.attentions.0",
    "up_blocks.0.attentions.0",
    "up_blocks.0.attentions.1",
    "up_blocks.0.attentions.2",
    "up_blocks.1.attentions.0",
    "up_blocks.1.attentions.1",
    "up_blocks.1.attentions.2",
)
Selection = dict[str, tuple[str, float]]  # block name -> ("w" or "c", factor)


def _of(names: tuple[str, ...] | list[str], base: str = "w", factor: float = 1.0) -> Selection:
    return {name: (base, factor) for name in names}


SELECTIONS: dict[str, dict[str, Selection]] = {
    "SD1.5": {
        "style transfer": _of(_SD15_STYLE),
        "composition": {_SD15_COMPOSITION[0]: ("w", 0.25), _SD15_COMPOSITION[1]: ("w", 1.0)},
        "strong style transfer": _of(_SD15_STYLE) | _of(_SD15_MIDDLE_UP),
        "style and composition": _of(_SD15_STYLE)
        | {_SD15_COMPOSITION[0]: ("c", 0.25), _SD15_COMPOSITION[1]: ("c", 1.0)},
        "style transfer precise": _of(_SD15_STYLE)
        | {_SD15_COMPOSITION[0]: ("w", 0.25), _SD15_COMPOSITION[1]: ("w", 1.0)},
        "composition precise": _of(_SD15_STYLE)
        | {_SD15_COMPOSITION[0]: ("w", 0.25), _SD15_COMPOSITION[1]: ("w", 1.0)}
        | _of(_SD15_MIDDLE_UP, factor=0.1),
    },
    "SDXL": {
        "style transfer": _of([_SDXL_STYLE]),
        "composition": _of([_SDXL_COMPOSITION]),
        "strong style transfer": _of([name for name in _SDXL_ALL if name != _SDXL_COMPOSITION]),
        "style and composition": {_SDXL_COMPOSITION: ("c", 1.0), _SDXL_STYLE: ("w", 1.0)},
        "style transfer precise": _of([_SDXL_COMPOSITION, _SDXL_STYLE]),
        "composition precise": _of(
            [name for name in _SDXL_ALL if name not in (_SDXL_COMPOSITION, _SDXL_STYLE)], factor=0.1
        )
        | _of([_SDXL_COMPOSITION, _SDXL_STYLE]),
    },
}
COMPOSITION_BLOCKS = {"SD1.5": _SD15_COMPOSITION, "SDXL": (_SDXL_COMPOSITION,)}
"""Where the precise variants swap: style transfer precise there, composition precise everywhere else."""


@dataclass(frozen=True)
class SpatialTransformerPlace:
    """Where a spatial transformer sits: its diffusers name, its number in run order, and its section."""

    name: str
    index: int
    section: str


def spatial_transformers(config: UNetConfig) -> list[SpatialTransformerPlace]:
    """The UNet's spatial transformers in run order (down, middle, up), with their diffusers names."""
    levels = len(config.block_channels)
    places: list[SpatialTransformerPlace] = []
    for level in range(levels):
        if config.transformer_depth[level]:
            for attention in range(config.layers_per_block):
                places.append(
                    SpatialTransformerPlace(f"down_blocks.{level}.attentions.{attention}", len(places), INPUT)
                )
    if config.middle_transformer_depth:
        places.append(SpatialTransformerPlace("mid_block.attentions.0", len(places), MIDDLE))
    for up in range(levels):
        if config.transformer_depth[levels - 1 - up]:
            for attention in range(config.layers_per_block + 1):
                places.append(
                    SpatialTransformerPlace(f"up_blocks.{up}.attentions.{attention}", len(places), OUTPUT)
                )
    return places


def cross_attention_places(config: UNetConfig) -> list[SpatialTransformerPlace]:
    """For each cross-attention block in `cross_attention_blocks` order (down, up, middle; one per transformer
    block), the spatial transformer it belongs to."""
    levels = len(config.block_channels)
    by_name = {place.name: place for place in spatial_transformers(config)}
    out: list[SpatialTransformerPlace] = []
    for level in range(levels):
        for attention in range(config.layers_per_block if config.transformer_depth[level] else 0):
            out += [by_name[f"down_blocks.{level}.attentions.{attention}"]] * config.transformer_depth[level]
    for up in range(levels):
        depth = config.transformer_depth[levels - 1 - up]
        for attention in range(config.layers_per_block + 1 if depth else 0):
            out += [by_name[f"up_blocks.{up}.attentions.{attention}"]] * depth
    if config.middle_transformer_depth:
        out += [by_name["mid_block.attentions.0"]] * config.middle_transformer_depth
    return out


@dataclass(frozen=True)
class BlockWeights:
    """Resolved per-block weights: `scales[i]` for the i-th cross-attention block (`cross_attention_blocks`
    order); in the blocks of `swapped`, the positive rows see zero tokens and the negative rows the reference."""

    scales: tuple[float, ...]
    swapped: frozenset[int] = frozenset()


def parse_layer_weights(text: str) -> list[tuple[str | int | None, float]]:
    """'3:1, up_blocks.0.attentions.1:0.5' -> [(3, 1.0), ("up_blocks...", 0.5)]; '1, 0, 0.5' -> [(None, 1.0), ...]."""
    items = [item.strip() for item in text.replace(";", ",").replace("\n", ",").split(",") if item.strip()]
    pairs: list[tuple[str | int | None, float]] = []
    keyed = [":" in item for item in items]
    if any(keyed) and not all(keyed):
        raise ValueError(
            f"layer_weights mixes 'block:weight' pairs and bare weights: {text!r}; use one form "
            "(e.g. '3:1, 6:1' or '0, 0, 0, 1')"
        )
    for item in items:
        key: str | int | None = None
        value = item
        if ":" in item:
            name, _, value = item.rpartition(":")
            name = name.strip()
            key = int(name) if name.isdigit() else name
        try:
            pairs.append((key, float(value)))
        except ValueError as error:
            raise ValueError(
                f"layer_weights: {item!r} is not 'block:weight' or a number (e.g. '3:1, 6:1' or '0, 1, 0')"
            ) from error
    return pairs


def _family(config: UNetConfig) -> str:
    return "SDXL" if config.addition_embedding == "text_time" else "SD1.5"


def block_weights(
    config: UNetConfig,
    weight: float,
    weight_type: str = "linear",
    weight_composition: float = 1.0,
    layer_weights: str = "",
) -> BlockWeights:
    """Per cross-attention block weights of an IP-Adapter on a UNet of `config` (see the module docstring)."""
    if weight_type not in WEIGHT_TYPES:
        raise ValueError(f"unknown IP-Adapter weight_type {weight_type!r}; one of {', '.join(WEIGHT_TYPES)}")
    places = spatial_transformers(config)
    count = len(places)
    per_place: dict[int, float]
    family = _family(config)
    if layer_weights.strip():
        per_place = {}
        pairs = parse_layer_weights(layer_weights)
        if pairs and pairs[0][0] is None:
            if len(pairs) != count:
                raise ValueError(
                    f"layer_weights lists {len(pairs)} weights; this UNet has {count} attention blocks "
                    f"({', '.join(place.name for place in places)}): give one per block or 'block:weight' pairs"
                )
            per_place = {index: value * weight for index, (_, value) in enumerate(pairs)}
        for key, value in pairs if pairs and pairs[0][0] is not None else []:
            if isinstance(key, int):
                if key >= count:
                    raise ValueError(
                        f"layer_weights: block {key} does not exist (this UNet has 0-{count - 1})"
                    )
                per_place[key] = value * weight
            else:
                matches = [place.index for place in places if place.name.startswith(str(key))]
                if not matches:
                    raise ValueError(
                        f"layer_weights: no attention block is named {key!r} (this UNet has "
                        f"{', '.join(place.name for place in places)})"
                    )
                for index in matches:
                    per_place[index] = value * weight
    elif weight_type in SELECTIONS[family]:
        selection = SELECTIONS[family][weight_type]
        per_place = {
            place.index: (weight if selection[place.name][0] == "w" else weight_composition)
            * selection[place.name][1]
            for place in places
            if place.name in selection
        }
    else:
        per_place = {place.index: weight * _curve(weight_type, place, count) for place in places}
    swapped_places: set[int] = set()
    if weight_type in ("style transfer precise", "composition precise"):
        composition = {place.index for place in places if place.name in COMPOSITION_BLOCKS[family]}
        others = {place.index for place in places} - composition
        swapped_places = composition if weight_type == "style transfer precise" else others
    blocks = cross_attention_places(config)
    return BlockWeights(
        tuple(per_place.get(place.index, 0.0) for place in blocks),
        frozenset(i for i, place in enumerate(blocks) if place.index in swapped_places),
    )


def _curve(weight_type: str, place: SpatialTransformerPlace, count: int) -> float:
    t, half = place.index, count / 2
    if weight_type == "ease in":
        return 0.05 + 0.95 * (1 - t / count)
    if weight_type == "ease out":
        return 0.05 + 0.95 * (t / count)
    if weight_type == "ease in-out":
        return 0.05 + 0.95 * (1 - abs(t - half) / half)
    if weight_type == "reverse in-out":
        return 0.05 + 0.95 * (abs(t - half) / half)
    weak = {"weak input": (INPUT,), "weak middle": (MIDDLE,), "weak output": (OUTPUT,)}
    weak["strong middle"] = (INPUT, OUTPUT)
    if place.section in weak.get(weight_type, ()):
        return 0.2
    return 1.0
