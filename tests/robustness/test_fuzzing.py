"""Issue 11, part 6: property-based fuzzing of the parsers users' files go through (hypothesis, 1,000 cases each).

- Checkpoint key parsers: LDM UNet / autoencoder key shapes and diffusers config.json, real ones then mutated
  (keys dropped, renamed, added, shapes changed), parse to a config or raise `CheckpointError` naming the file;
  unmutated, they give the real config back (and the LDM and diffusers key maps are bijections).
- LoRA key parsers: a real module named the kohya, diffusers or peft way parses back to that same module; random
  and mutated names with random shapes never raise and never land on a module their name does not spell.
- Workflow parser: the example workflows (API and editor format), mutated, give a plan or a `WorkflowError`
  naming the node; never a KeyError, TypeError or other exception.

Every test is derandomized (the same cases on every run) and runs no model forward pass.
"""

import copy
import dataclasses
import functools
import inspect
import json
import string

import pytest
import torch
from hypothesis import HealthCheck, currently_in_test_context, event, given, settings
from hypothesis import strategies as st

from foundationals.clip.config import text_preset
from foundationals.clip.text_encoder import CLIPTextEncoder, transformer_layer_names
from foundationals.formats.clip import (
    TEXT_LAYOUTS,
    CLIPKeyError,
    convert_clip_state_dict,
    count_layers,
    detect_layout,
    export_clip_state_dict,
)
from foundationals.formats.diffusers import diffusers_unet_key_map, unet_config_from_diffusers
from foundationals.formats.ldm import (
    LDM_UNET_PREFIX,
    CheckpointError,
    detect_family,
    infer_autoencoder_config,
    infer_unet_config,
    ldm_autoencoder_key_map,
    ldm_unet_key_map,
)
from foundationals.formats.ldm import refuse_other_architectures as _refuse_other_architectures
from foundationals.formats.lora import (
    DIFFUSERS_PREFIXES,
    KNOWN_NAMESPACES,
    KOHYA_PREFIXES,
    KOHYA_SUFFIXES,
    SD15,
    TEXT_ENCODER,
    UNET,
    LoraFile,
    canonical_modules,
    kohya_name_table,
    normalize_lora,
)
from foundationals.latent_diffusion.auto_encoder import LatentDiffusionAutoencoder
from foundationals.latent_diffusion.model_config import (
    SD15_AUTOENCODER,
    TINY_8X_AUTOENCODER,
    TINY_AUTOENCODER,
    UNET_PRESETS,
    AutoencoderConfig,
    UNetConfig,
)
from foundationals.latent_diffusion.unet import UNet
from nodes.demo import EXAMPLES
from nodes.runner import ExecutionPlan, all_node_classes, plan
from nodes.workflow import WorkflowError, parse_workflow

CASES = 1000
FUZZ = settings(
    max_examples=CASES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
        HealthCheck.function_scoped_fixture,
    ],
)
SOURCE = "fuzzed.safetensors"

# --- strategies shared by the tests -------------------------------------------------------------------------------

dims = st.integers(min_value=0, max_value=2048)
shapes = st.lists(dims, min_size=0, max_size=4).map(tuple)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=True)
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)


def segments_of(keys) -> list[str]:  # noqa: ANN001
    return sorted({part for key in keys for part in key.split(".")})


def key_strategy(keys) -> st.SearchStrategy[str]:  # noqa: ANN001
    """Keys made of the real keys' segments, digits and junk, joined by dots: near misses of real names."""
    segment = (
        st.sampled_from(segments_of(keys))
        | st.integers(0, 40).map(str)
        | st.text(string.ascii_lowercase + "_", min_size=1, max_size=6)
    )
    return st.lists(segment, min_size=1, max_size=8).map(".".join) | st.sampled_from(sorted(keys))


def mutations(keys, values) -> st.SearchStrategy[list[tuple]]:  # noqa: ANN001
    """Edits of a mapping: drop a key, rename it, give it another value, add a key."""
    edit = st.one_of(
        st.tuples(st.just("drop"), st.integers(0, 10**6)),
        st.tuples(st.just("rename"), st.integers(0, 10**6), key_strategy(keys)),
        st.tuples(st.just("change"), st.integers(0, 10**6), values),
        st.tuples(st.just("add"), key_strategy(keys), values),
    )
    return st.lists(edit, min_size=1, max_size=6)


def mutate(mapping: dict, edits: list[tuple]) -> dict:
    result = dict(mapping)
    for edit in edits:
        names = list(result)
        if edit[0] == "add":
            result[edit[1]] = edit[2]
            continue
        if not names:
            continue
        name = names[edit[1] % len(names)]
        if edit[0] == "drop":
            del result[name]
        elif edit[0] == "rename":
            result[edit[2]] = result.pop(name)
        else:
            result[name] = edit[2]
    return result


# --- (a) checkpoint key parsers ----------------------------------------------------------------------------------

UNET_POOL: dict[str, UNetConfig] = {
    **UNET_PRESETS,
    "tiny_one_layer": UNET_PRESETS["tiny"].with_changes(layers_per_block=1),
    "tiny_linear": UNET_PRESETS["tiny"].with_changes(use_linear_projection=True, transformer_depth=(2, 1, 0)),
    "tiny_two_levels": UNET_PRESETS["tiny"].with_changes(block_channels=(32, 64), transformer_depth=(0, 1)),
}
FAMILIES = {"sd15", "sd15_inpainting", "sdxl_base", "sdxl_inpainting"}
SHAPE_FIELDS = [
    f.name
    for f in dataclasses.fields(UNetConfig)
    if f.name not in ("num_attention_heads", "attention_head_dim", "pooled_text_dim", "time_id_embedding_dim")
]


@functools.cache
def unet_maps(name: str) -> tuple[dict[str, tuple[int, ...]], dict[str, str], dict[str, str], frozenset[str]]:
    """LDM key shapes, our key -> LDM key, our key -> diffusers key, our keys: of a UNet built on meta."""
    unet = UNet(UNET_POOL[name], device="meta")
    state = unet.state_dict()
    ldm, diffusers = ldm_unet_key_map(unet), diffusers_unet_key_map(unet)
    shapes_ = {theirs: tuple(state[ours].shape) for theirs, ours in ldm.items()}
    return shapes_, {v: k for k, v in ldm.items()}, {v: k for k, v in diffusers.items()}, frozenset(state)


@functools.cache
def all_ldm_keys() -> list[str]:
    return sorted({key for name in UNET_POOL for key in unet_maps(name)[0]})


def shape_fields(config: UNetConfig) -> dict:
    return {name: getattr(config, name) for name in SHAPE_FIELDS}


@pytest.mark.parametrize("name", sorted(UNET_POOL))
def test_real_unet_key_maps_are_bijections_and_shapes_give_the_config_back(name):
    shapes_, to_ldm, to_diffusers, ours = unet_maps(name)
    assert (
        set(to_ldm) == ours and set(to_diffusers) == ours
    )  # every tensor has one LDM and one diffusers name
    assert len(set(to_ldm.values())) == len(ours) and len(set(to_diffusers.values())) == len(ours)
    config = infer_unet_config(shapes_, SOURCE)
    assert shape_fields(config) == shape_fields(UNET_POOL[name])
    if name in UNET_PRESETS:
        assert config == UNET_PRESETS[name]
    expected = {"sd15": "sd15", "sd15_inpainting": "sd15_inpainting", "sdxl_base": "sdxl_base"}
    assert detect_family(config, SOURCE) == expected.get(name, "sdxl_base" if "sdxl" in name else "sd15")


@FUZZ
@given(
    name=st.sampled_from(sorted(UNET_POOL)),
    edits=st.deferred(lambda: mutations(all_ldm_keys(), shapes)),
)
def test_mutated_unet_key_shapes_give_a_config_or_a_checkpoint_error(name, edits):
    shapes_ = mutate(unet_maps(name)[0], edits)
    try:
        config = infer_unet_config(shapes_, SOURCE)
        family = detect_family(config, SOURCE)
    except CheckpointError as error:
        assert SOURCE in str(error)
        event("CheckpointError")
        return
    event(f"parsed as {family}")
    assert isinstance(config, UNetConfig) and family in FAMILIES
    assert all(isinstance(c, int) and c > 0 for c in config.block_channels)
    assert config.in_channels == shapes_["input_blocks.0.0.weight"][1]


checkpoint_prefixes = st.sampled_from(
    [
        LDM_UNET_PREFIX,
        "first_stage_model.",
        "cond_stage_model.",
        "cond_stage_model.model.",
        "conditioner.",
        "",
    ]
)
foreign_keys = st.sampled_from(["joint_blocks.0.context_block.x", "double_blocks.0.x", "single_blocks.0.x"])


@FUZZ
@given(
    keys=st.lists(
        st.tuples(checkpoint_prefixes, st.deferred(lambda: key_strategy(all_ldm_keys())) | foreign_keys).map(
            "".join
        ),
        max_size=12,
    )
)
def test_single_file_key_sets_are_accepted_or_refused_with_a_checkpoint_error(keys):
    try:
        _refuse_other_architectures(keys, SOURCE)
    except CheckpointError as error:
        assert SOURCE in str(error) and "unsupported" in str(error) or "not a Stable Diffusion" in str(error)
        return
    assert any(key.startswith(LDM_UNET_PREFIX + "input_blocks.") for key in keys)
    assert not (any("double_blocks." in k for k in keys) and any("single_blocks." in k for k in keys))


AUTOENCODER_POOL = {"sd15": SD15_AUTOENCODER, "tiny": TINY_AUTOENCODER, "tiny_8x": TINY_8X_AUTOENCODER}


@functools.cache
def autoencoder_shapes(name: str) -> dict[str, tuple[int, ...]]:
    autoencoder = LatentDiffusionAutoencoder(AUTOENCODER_POOL[name], device="meta")
    state = autoencoder.state_dict()
    return {theirs: tuple(state[ours].shape) for theirs, ours in ldm_autoencoder_key_map(autoencoder).items()}


@FUZZ
@given(
    name=st.sampled_from(sorted(AUTOENCODER_POOL)),
    edits=st.lists(st.deferred(lambda: mutations(autoencoder_shapes("tiny"), shapes)), max_size=1),
)
def test_autoencoder_key_shapes_give_the_config_or_a_checkpoint_error(name, edits):
    real = AUTOENCODER_POOL[name]
    shapes_ = mutate(autoencoder_shapes(name), edits[0] if edits else [])
    try:
        config = infer_autoencoder_config(shapes_, real.scaling_factor, SOURCE)
    except CheckpointError as error:
        assert SOURCE in str(error)
        assert edits, "the real autoencoder's shapes were refused"
        return
    assert isinstance(config, AutoencoderConfig)
    assert all(isinstance(c, int) and c > 0 for c in config.block_channels)
    if not edits:
        assert config == real


DIFFUSERS_SD15_CONFIG = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "use_linear_projection": False,
}
DIFFUSERS_SDXL_CONFIG = {
    **DIFFUSERS_SD15_CONFIG,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280],
    "transformer_layers_per_block": [1, 2, 10],
    "cross_attention_dim": 2048,
    "attention_head_dim": [5, 10, 20],
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
DIFFUSERS_CONFIGS = {"sd15": DIFFUSERS_SD15_CONFIG, "sdxl_base": DIFFUSERS_SDXL_CONFIG}


def test_real_diffusers_unet_configs_give_the_preset():
    for name, config in DIFFUSERS_CONFIGS.items():
        assert shape_fields(unet_config_from_diffusers(config, SOURCE)) == shape_fields(UNET_PRESETS[name])


@FUZZ
@given(
    name=st.sampled_from(sorted(DIFFUSERS_CONFIGS)),
    edits=mutations(sorted(DIFFUSERS_SDXL_CONFIG), json_values),
)
def test_mutated_diffusers_unet_configs_give_a_valid_config_or_a_checkpoint_error(name, edits):
    config_json = mutate(DIFFUSERS_CONFIGS[name], edits)
    try:
        config = unet_config_from_diffusers(config_json, SOURCE)
    except CheckpointError as error:
        assert SOURCE in str(error)
        return
    for field in ("in_channels", "out_channels", "layers_per_block", "context_dim", "num_groups"):
        value = getattr(config, field)
        assert type(value) is int and value > 0, f"{field} = {value!r}"
    assert all(type(c) is int and c > 0 for c in config.block_channels)
    assert all(type(d) is int and d >= 0 for d in config.transformer_depth)
    assert len(config.transformer_depth) == len(config.block_channels)


CLIP_PRESETS = {"sdxl_clip_g": "tiny_bigg", "open_clip": "tiny_bigg"}


@functools.cache
def clip_text_files() -> dict[str, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[str]]]:
    """A tiny text encoder's tensors exported in every text layout: (file tensors, our tensors, layer names)."""
    files = {}
    for name, layout in TEXT_LAYOUTS.items():
        torch.manual_seed(0)
        encoder = CLIPTextEncoder(text_preset(CLIP_PRESETS.get(name, "tiny")))
        names = transformer_layer_names(encoder.config.num_layers)
        ours = encoder.state_dict()
        files[name] = (export_clip_state_dict(ours, layout, names), ours, names)
    return files


@functools.cache
def all_clip_keys() -> list[str]:
    return sorted({key for exported, _, _ in clip_text_files().values() for key in exported})


def clip_key_edits() -> st.SearchStrategy[list[tuple]]:
    """Edits of real keys, plus keys under a real layers prefix with a junk layer number."""
    prefixes = sorted({layout.root + layout.layers_prefix for layout in TEXT_LAYOUTS.values()})
    under_layers = st.tuples(
        st.sampled_from(prefixes),
        st.sampled_from(["x", "1a", "-1", "", "01", "3"]),
        st.just(".mlp.fc1.weight"),
    ).map("".join)
    junk_layer = st.tuples(st.just("add"), under_layers, st.just(torch.zeros(2, 2)))
    return st.lists(junk_layer, max_size=2).flatmap(
        lambda extra: mutations(all_clip_keys(), st.just(torch.zeros(2, 2))).map(lambda edits: edits + extra)
    )


@FUZZ
@given(
    layout=st.sampled_from(sorted(TEXT_LAYOUTS)),
    edits=st.lists(st.deferred(clip_key_edits), max_size=1),
)
def test_clip_text_keys_convert_back_or_raise_clip_key_error(layout, edits):
    exported, ours, names = clip_text_files()[layout]
    state = mutate(exported, edits[0] if edits else [])
    try:
        found = detect_layout(state, TEXT_LAYOUTS, "CLIP text encoder")
        layers = count_layers(state, found)
        converted = convert_clip_state_dict(state, found, transformer_layer_names(layers))
    except CLIPKeyError as error:
        assert str(error)
        assert edits, f"the real {layout} keys were refused: {error}"
        outcome("CLIPKeyError")
        return
    outcome("converted")
    assert found.signature in state
    if not edits:
        assert found.name == layout or found.signature == TEXT_LAYOUTS[layout].signature
        assert converted.keys() == ours.keys()
        assert all(torch.equal(converted[key], ours[key]) for key in ours)


# --- (b) LoRA key parsers -----------------------------------------------------------------------------------------

NAMESPACES = {namespace.name: namespace for namespace in KNOWN_NAMESPACES}


@functools.cache
def kohya_table(namespace: str) -> dict[str, tuple[str, str]]:
    return kohya_name_table(NAMESPACES[namespace])


@functools.cache
def kohya_names(namespace: str) -> list[str]:
    return sorted(kohya_table(namespace))


@functools.cache
def canonical(namespace: str) -> dict[str, list[str]]:
    return canonical_modules(NAMESPACES[namespace])


ROLES = {
    "lora": ("lora_down.weight", "lora_up.weight"),
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
    "lokr": ("lokr_w1", "lokr_w2"),
    "full": ("diff",),
}


def layer_tensors(method: str, rank: int, out_features: int, in_features: int) -> dict[str, torch.Tensor]:
    """The kohya/LyCORIS tensors of one layer (suffix -> tensor) with consistent shapes."""
    if method == "lora":
        return {
            "lora_down.weight": torch.zeros(rank, in_features),
            "lora_up.weight": torch.zeros(out_features, rank),
        }
    if method == "loha":
        return {
            "hada_w1_a": torch.zeros(out_features, rank),
            "hada_w1_b": torch.zeros(rank, in_features),
            "hada_w2_a": torch.zeros(out_features, rank),
            "hada_w2_b": torch.zeros(rank, in_features),
        }
    if method == "lokr":
        return {"lokr_w1": torch.zeros(1, 1), "lokr_w2": torch.zeros(out_features, in_features)}
    return {"diff": torch.zeros(out_features, in_features)}


@st.composite
def kohya_layers(draw):  # noqa: ANN001, ANN201
    namespace = draw(st.sampled_from(sorted(NAMESPACES)))
    name = draw(st.sampled_from(kohya_names(namespace)))
    method = draw(st.sampled_from(sorted(ROLES)))
    rank, out_features, in_features = (
        draw(st.integers(1, 8)),
        draw(st.integers(1, 12)),
        draw(st.integers(1, 12)),
    )
    alpha = draw(st.none() | st.floats(0.5, 64))
    return namespace, name, method, rank, alpha, layer_tensors(method, rank, out_features, in_features)


@FUZZ
@given(layer=kohya_layers(), auto=st.booleans())
def test_a_real_module_named_the_kohya_way_parses_back_to_that_module(layer, auto):
    namespace, name, method, rank, alpha, tensors = layer
    state = {f"{name}.{suffix}": tensor for suffix, tensor in tensors.items()}
    if alpha is not None:
        state[f"{name}.alpha"] = torch.tensor(alpha)
    lora = normalize_lora(state, None if auto else NAMESPACES[namespace])
    assert lora.format == "kohya" and lora.unmatched == []
    assert len(lora.weights) == 1
    weights = lora.weights[0]
    resolved_in = lora.namespace if auto else namespace
    assert (weights.component, weights.module) == kohya_table(resolved_in)[name]
    assert (weights.component, weights.module) == kohya_table(namespace)[
        name
    ]  # whichever family it resolved in
    assert weights.method == method and weights.source == name
    assert weights.alpha == (None if alpha is None else pytest.approx(alpha))
    if method == "lora":
        assert weights.rank == rank


def test_a_kohya_name_means_the_same_module_in_every_family_that_has_it():
    sd15, sdxl = kohya_table("SD1.5"), kohya_table("SDXL")
    shared = set(sd15) & set(sdxl)
    assert len(shared) > 100  # e.g. the text encoder's and the first levels' names
    assert [name for name in shared if sd15[name] != sdxl[name]] == []


DIFFUSERS_STYLES = ("peft", "peft_named", "diffusers", "diffusers_linear_layer", "bare_peft")


def render_diffusers(component: str, module: str, style: str, role: str) -> str:
    prefix = {UNET: "unet.", TEXT_ENCODER: "text_encoder.", "text_encoder_2": "text_encoder_2."}[component]
    if style == "bare_peft":
        prefix = "base_model.model."
    suffix = {
        "peft": {"down": ".lora_A.weight", "up": ".lora_B.weight"},
        "peft_named": {"down": ".lora_A.default_0.weight", "up": ".lora_B.default_0.weight"},
        "bare_peft": {"down": ".lora_A.weight", "up": ".lora_B.weight"},
        "diffusers": {"down": ".lora.down.weight", "up": ".lora.up.weight"},
        "diffusers_linear_layer": {
            "down": ".lora_linear_layer.down.weight",
            "up": ".lora_linear_layer.up.weight",
        },
    }[style][role]
    return prefix + module + suffix


@st.composite
def diffusers_layers(draw):  # noqa: ANN001, ANN201
    namespace = draw(st.sampled_from(sorted(NAMESPACES)))
    component = draw(st.sampled_from(sorted(canonical(namespace))))
    module = draw(st.sampled_from(canonical(namespace)[component]))
    style = draw(st.sampled_from(DIFFUSERS_STYLES))
    if style == "bare_peft" and component == "text_encoder_2":
        style = "peft"  # a bare peft save cannot say which of two text encoders it is
    return component, module, style, draw(st.integers(1, 8))


@FUZZ
@given(layer=diffusers_layers())
def test_a_real_module_named_the_diffusers_or_peft_way_parses_back_to_that_module(layer):
    component, module, style, rank = layer
    state = {
        render_diffusers(component, module, style, "down"): torch.zeros(rank, 6),
        render_diffusers(component, module, style, "up"): torch.zeros(5, rank),
    }
    lora = normalize_lora(state)
    assert lora.unmatched == [] and len(lora.weights) == 1
    weights = lora.weights[0]
    assert (weights.component, weights.module, weights.method, weights.rank) == (
        component,
        module,
        "lora",
        rank,
    )


def mutated_name(name: str, position: int, edit: str, character: str) -> str:
    position %= len(name) + 1
    if edit == "insert":
        return name[:position] + character + name[position:]
    if edit == "delete":
        return name[:position] + name[position + 1 :]
    if edit == "replace":
        return name[:position] + character + name[position + 1 :]
    parts = name.split("_")  # drop one underscore-separated segment
    return "_".join(parts[: position % len(parts)] + parts[position % len(parts) + 1 :])


@st.composite
def lora_key_names(draw):  # noqa: ANN001, ANN201
    """Random, near-miss and real layer names, in kohya or diffusers spelling."""
    namespace = draw(st.sampled_from(sorted(NAMESPACES)))
    real = draw(st.sampled_from(kohya_names(namespace)))
    kind = draw(st.sampled_from(["real", "mutated", "prefixed_junk", "diffusers_junk", "junk"]))
    if kind == "real":
        return real
    if kind == "mutated":
        edit = draw(st.sampled_from(["insert", "delete", "replace", "drop_segment"]))
        return mutated_name(real, draw(st.integers(0, 200)), edit, draw(st.sampled_from("_.0123456789abz")))
    junk = draw(st.text(string.ascii_lowercase + string.digits + "_.", max_size=40))
    if kind == "prefixed_junk":
        return draw(st.sampled_from(sorted(KOHYA_PREFIXES))) + junk
    if kind == "diffusers_junk":
        return draw(st.sampled_from(sorted(DIFFUSERS_PREFIXES))) + junk
    return junk


suffixes = st.sampled_from(
    sorted(KOHYA_SUFFIXES)
    + [
        "alpha",
        "dora_scale",
        "lora_A.weight",
        "lora_B.weight",
        "lora.down.weight",
        "lora.up.weight",
        "weight",
        "",
    ]
)
tensors = st.tuples(
    st.lists(st.integers(0, 6), max_size=4), st.sampled_from([torch.float32, torch.float16])
).map(lambda spec: torch.zeros(spec[0], dtype=spec[1]))


@FUZZ
@given(
    entries=st.lists(st.tuples(lora_key_names(), suffixes, tensors), min_size=1, max_size=10),
    namespace=st.sampled_from([None, *sorted(NAMESPACES)]),
)
def test_random_and_mutated_lora_keys_never_raise_and_never_mis_map(entries, namespace):
    state = {(f"{name}.{suffix}" if suffix else name): tensor for name, suffix, tensor in entries}
    lora = normalize_lora(state, NAMESPACES[namespace] if namespace else None)
    assert isinstance(lora, LoraFile)
    event(f"{lora.format}: {'some' if lora.weights else 'no'} layers placed")
    if lora.format == "kohya":
        table = kohya_table(lora.namespace)
        for weights in lora.weights:  # a placed layer is exactly what its kohya name spells, nothing near it
            assert table[weights.source] == (weights.component, weights.module)
            assert any(key.startswith(weights.source + ".") for key in state)
    else:
        for weights in lora.weights:
            assert weights.source in state
            assert weights.module in weights.source or weights.component != UNET
    if not lora.weights:
        assert lora.unmatched, "keys vanished: neither placed nor reported"


# --- (c) workflow parser ----------------------------------------------------------------------------------------

API_EXAMPLES = {path.name: json.loads(path.read_text()) for path in sorted(EXAMPLES.glob("*.api.json"))}
UI_EXAMPLES = {
    path.name: json.loads(path.read_text())
    for path in sorted(EXAMPLES.glob("*.json"))
    if not path.name.endswith(".api.json")
}
GLOBAL_ERRORS = ("not a ComfyUI workflow", "no output node", "cycle", "'links' table", "UI workflow node #")


@pytest.fixture(scope="module")
def node_classes() -> dict[str, type]:
    return all_node_classes()


def outcome(label: str) -> None:
    """Count outcomes in hypothesis' statistics (`--hypothesis-show-statistics`)."""
    if currently_in_test_context():
        event(label)


def check_workflow(data, classes):  # noqa: ANN001, ANN201
    """parse_workflow then plan: a plan, or a WorkflowError that names the node (or the whole-graph problem)."""
    try:
        workflow = parse_workflow(data, classes)
        result = plan(workflow.prompt, classes)
    except WorkflowError as error:
        outcome("workflow error" + (" naming a node" if error.node_id is not None else ""))
        message = str(error)
        if error.node_id is None:
            assert any(fragment in message for fragment in GLOBAL_ERRORS), message
        else:
            assert message.startswith(f"node {error.node_id}"), message
        return error
    outcome("plan")
    kinds = {"INT": int, "FLOAT": float, "STRING": str, "BOOLEAN": bool}
    for node_id in result.order:  # every literal the plan hands a node has the type its input declares
        assert node_id in workflow.prompt
        custom = getattr(result.classes[node_id], "VALIDATE_INPUTS", None)  # the node checks these itself
        own_checks = set(inspect.signature(custom).parameters) if custom is not None else set()
        for name, value in result.literals[node_id].items():
            spec = result.specs[node_id][name]
            if name in own_checks:
                continue
            if spec.choices is not None:
                assert value in spec.choices
            elif spec.type_name in kinds:
                assert type(value) is kinds[spec.type_name], (node_id, name, value)
    return result


node_values = json_values | st.tuples(
    st.text(string.digits, min_size=1, max_size=3), st.integers(-2, 12)
).map(list)


@st.composite
def api_mutations(draw):  # noqa: ANN001, ANN201
    example = draw(st.sampled_from(sorted(API_EXAMPLES)))
    prompt = copy.deepcopy(API_EXAMPLES[example])
    for _ in range(draw(st.integers(1, 4))):
        ids = sorted(prompt)
        if not ids:
            break
        node_id = draw(st.sampled_from(ids))
        node = prompt[node_id]
        edit = draw(
            st.sampled_from(["drop_node", "drop_input", "set_input", "class", "node_value", "inputs", "new"])
        )
        inputs = node.get("inputs") if isinstance(node, dict) else None
        if edit == "drop_node":
            del prompt[node_id]
        elif edit in ("drop_input", "set_input") and isinstance(inputs, dict) and inputs:
            name = draw(st.sampled_from(sorted(inputs)))
            if edit == "drop_input":
                del inputs[name]
            else:
                inputs[name] = draw(node_values)
        elif edit == "class" and isinstance(node, dict):
            node["class_type"] = draw(st.sampled_from(sorted(all_node_classes())) | json_scalars)
        elif edit == "node_value":
            prompt[node_id] = draw(json_values)
        elif edit == "inputs" and isinstance(node, dict):
            node["inputs"] = draw(json_values)
        elif edit == "new":
            prompt[draw(st.text(string.digits, min_size=1, max_size=3))] = {
                "class_type": draw(st.sampled_from(sorted(all_node_classes()))),
                "inputs": draw(st.dictionaries(st.text(max_size=10), node_values, max_size=3)),
            }
    return prompt


@FUZZ
@given(prompt=api_mutations())
def test_mutated_api_workflows_give_a_plan_or_a_workflow_error_naming_the_node(
    robustness_folders, node_classes, prompt
):
    result = check_workflow(prompt, node_classes)
    assert isinstance(result, (ExecutionPlan, WorkflowError))


@st.composite
def ui_mutations(draw):  # noqa: ANN001, ANN201
    example = draw(st.sampled_from(sorted(UI_EXAMPLES)))
    ui = copy.deepcopy(UI_EXAMPLES[example])
    for _ in range(draw(st.integers(1, 4))):
        edit = draw(
            st.sampled_from(
                [
                    "drop_node",
                    "node_field",
                    "input_entry",
                    "widgets",
                    "link",
                    "drop_link",
                    "links",
                    "mode",
                    "top",
                ]
            )
        )
        nodes, links = ui.get("nodes"), ui.get("links")
        if (
            edit in ("drop_node", "node_field", "input_entry", "widgets", "mode")
            and isinstance(nodes, list)
            and nodes
        ):
            index = draw(st.integers(0, len(nodes) - 1))
            node = nodes[index]
            if edit == "drop_node":
                del nodes[index]
            elif not isinstance(node, dict):
                continue
            elif edit == "node_field":
                node[
                    draw(st.sampled_from(["id", "type", "inputs", "outputs", "widgets_values", "title"]))
                ] = draw(json_values)
            elif edit == "input_entry" and isinstance(node.get("inputs"), list) and node["inputs"]:
                position = draw(st.integers(0, len(node["inputs"]) - 1))
                entry = node["inputs"][position]
                if isinstance(entry, dict) and draw(st.booleans()):
                    entry[draw(st.sampled_from(["name", "link", "type"]))] = draw(json_values)
                else:
                    node["inputs"][position] = draw(json_values)
            elif edit == "widgets":
                values = node.get("widgets_values")
                if isinstance(values, list) and values and draw(st.booleans()):
                    values[draw(st.integers(0, len(values) - 1))] = draw(json_values)
                else:
                    node["widgets_values"] = draw(json_values)
            elif edit == "mode":
                node["mode"] = draw(st.sampled_from([0, 2, 4]) | json_scalars)
        elif edit == "link" and isinstance(links, list) and links:
            index = draw(st.integers(0, len(links) - 1))
            link = links[index]
            if isinstance(link, list) and link and draw(st.booleans()):
                link[draw(st.integers(0, len(link) - 1))] = draw(json_values)
            else:
                links[index] = draw(json_values)
        elif edit == "drop_link" and isinstance(links, list) and links:
            del links[draw(st.integers(0, len(links) - 1))]
        elif edit == "links":
            ui["links"] = draw(json_values)
        elif edit == "top":
            ui[draw(st.sampled_from(["nodes", "links", "definitions", "extra"]))] = draw(json_values)
    return ui


@FUZZ
@given(ui=ui_mutations())
def test_mutated_ui_workflows_give_a_plan_or_a_workflow_error_naming_the_node(
    robustness_folders, node_classes, ui
):
    result = check_workflow(ui, node_classes)
    assert isinstance(result, (ExecutionPlan, WorkflowError))


@pytest.mark.parametrize("name", sorted(API_EXAMPLES) + sorted(UI_EXAMPLES))
def test_the_unmutated_examples_plan(robustness_folders, node_classes, name):
    data = copy.deepcopy(API_EXAMPLES.get(name) or UI_EXAMPLES[name])
    assert isinstance(check_workflow(data, node_classes), ExecutionPlan)


# --- regressions: what the fuzzing found (each raised another exception type before) ------------------------------


def test_unet_shapes_of_the_wrong_rank_are_a_checkpoint_error_not_an_index_error():
    shapes_ = dict(unet_maps("tiny")[0])
    for key, shape in [("out.2.weight", ()), ("input_blocks.0.0.weight", (32,))]:
        broken = dict(shapes_, **{key: shape})
        with pytest.raises(
            CheckpointError, match=f"{SOURCE}: the UNet key shapes form no Stable Diffusion UNet"
        ):
            infer_unet_config(broken, SOURCE)
    to_k = next(key for key in shapes_ if key.endswith("attn2.to_k.weight"))
    with pytest.raises(CheckpointError, match="IndexError"):
        infer_unet_config(dict(shapes_, **{to_k: (32,)}), SOURCE)
    with pytest.raises(CheckpointError, match="zero width"):
        infer_unet_config(dict(shapes_, **{to_k: (32, 0)}), SOURCE)


def test_an_autoencoder_without_its_input_convolution_is_a_checkpoint_error_not_a_key_error():
    shapes_ = dict(autoencoder_shapes("tiny"))
    del shapes_["encoder.conv_in.weight"]
    with pytest.raises(CheckpointError, match="form no SD autoencoder"):
        infer_autoencoder_config(shapes_, 0.18215, SOURCE)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("block_out_channels", None),
        ("down_block_types", [None]),
        ("in_channels", "4"),
        ("attention_head_dim", "8"),
        ("transformer_layers_per_block", []),
        ("layers_per_block", 2.5),
        ("cross_attention_dim", True),
    ],
)
def test_diffusers_configs_with_values_of_the_wrong_type_are_a_checkpoint_error(option, value):
    with pytest.raises(CheckpointError, match=SOURCE):
        unet_config_from_diffusers(dict(DIFFUSERS_SD15_CONFIG, **{option: value}), SOURCE)


def test_lora_tensors_of_unusable_shapes_are_reported_not_raised():
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    cases = {
        "a scalar peft factor": {"unet.down_blocks.0.attn2.to_k.lora_A.weight": torch.zeros(())},
        "a 1-D cross-attention factor": {
            f"{name}.lora_down.weight": torch.zeros(4),
            f"{name}.lora_up.weight": torch.zeros(4, 4),
        },
        "an alpha of two values": {
            f"{name}.lora_down.weight": torch.zeros(4, 768),
            f"{name}.lora_up.weight": torch.zeros(320, 4),
            f"{name}.alpha": torch.zeros(2),
        },
        "an empty factor": {
            f"{name}.lora_down.weight": torch.zeros(0, 768),
            f"{name}.lora_up.weight": torch.zeros(320, 0),
        },
    }
    for case, state in cases.items():
        lora = normalize_lora(state, SD15)
        assert lora.weights == [], case
        assert any("shape" in reason for reason in lora.unmatched), (case, lora.unmatched)


def ui_example() -> dict:
    return copy.deepcopy(UI_EXAMPLES["sd15_txt2img.json"])


def test_malformed_ui_links_and_nodes_are_workflow_errors(node_classes, robustness_folders):
    broken = []
    ui = ui_example()
    ui["links"][0] = []  # was: ValueError (not enough values to unpack)
    broken.append((ui, "the 'links' table has a malformed entry #0", None))
    ui = ui_example()
    ui["links"] = {"1": [1, 1, 0, 2, 0, "MODEL"]}  # was: ValueError (its keys unpacked as entries)
    broken.append((ui, "the 'links' table must be a list", None))
    ui = ui_example()
    del ui["nodes"][0]["id"]  # was: KeyError 'id'
    broken.append((ui, "UI workflow node #0 is not an object with an 'id'", None))
    ui = ui_example()
    linked = next(
        node for node in ui["nodes"] if any(entry.get("link") for entry in node.get("inputs") or [])
    )
    entry = next(entry for entry in linked["inputs"] if entry.get("link"))
    entry["link"] = str(entry["link"])  # was: accepted through int("3")
    broken.append((ui, "link must be a link id or null", str(linked["id"])))
    ui = ui_example()
    ui["nodes"][0]["type"] = ["FluxionSampler"]  # was: TypeError (unhashable list)
    broken.append((ui, "'type' must be a string", str(ui["nodes"][0]["id"])))
    for data, fragment, node_id in broken:
        with pytest.raises(WorkflowError) as caught:
            parse_workflow(data, node_classes)
        assert fragment in str(caught.value) and caught.value.node_id == node_id
    ui = ui_example()
    ui["definitions"] = ["not", "a", "mapping"]  # was: AttributeError; harmless, so ignored
    assert isinstance(check_workflow(ui, node_classes), ExecutionPlan)


def test_a_clip_layer_key_without_a_layer_number_is_a_clip_key_error_not_a_value_error():
    exported, _, _ = clip_text_files()["sd15"]
    layout = TEXT_LAYOUTS["sd15"]
    broken = dict(exported, **{layout.root + layout.layers_prefix + "x.mlp.fc1.weight": torch.zeros(2, 2)})
    with pytest.raises(CLIPKeyError, match="has no layer number"):
        count_layers(broken, layout)


def test_a_load_image_value_that_is_no_file_name_is_a_workflow_error(node_classes, robustness_folders):
    prompt = copy.deepcopy(API_EXAMPLES["sd15_img2img.api.json"])
    node_id = next(i for i, node in prompt.items() if node["class_type"] == "LoadImage")
    for value in (None, 3, "bad\x00name.png"):  # were: AttributeError, AttributeError, ValueError
        prompt[node_id]["inputs"]["image"] = value
        with pytest.raises(WorkflowError, match="rejected by the node") as caught:
            plan(prompt, node_classes)
        assert caught.value.node_id == node_id and caught.value.class_type == "LoadImage"


def test_a_node_whose_own_input_check_raises_is_a_workflow_error_naming_it():
    class Picky:
        RETURN_TYPES = ()
        OUTPUT_NODE = True
        FUNCTION = "run"

        @classmethod
        def INPUT_TYPES(cls) -> dict:
            return {"required": {"text": ("STRING", {})}}

        @classmethod
        def VALIDATE_INPUTS(cls, text: str) -> bool:
            return text.startswith("ok")

    with pytest.raises(WorkflowError, match="rejected by the node: AttributeError") as caught:
        plan({"7": {"class_type": "Picky", "inputs": {"text": 12}}}, {"Picky": Picky})
    assert caught.value.node_id == "7"
    assert isinstance(
        plan({"7": {"class_type": "Picky", "inputs": {"text": "ok"}}}, {"Picky": Picky}), ExecutionPlan
    )


def test_an_api_prompt_with_one_broken_node_names_that_node(node_classes):
    prompt = copy.deepcopy(API_EXAMPLES["sd15_txt2img.api.json"])
    prompt["4"] = ["not", "a", "node"]  # was: "not a ComfyUI workflow", naming nothing
    with pytest.raises(WorkflowError, match="expected an object with 'class_type'") as caught:
        parse_workflow(prompt, node_classes)
    assert caught.value.node_id == "4"
