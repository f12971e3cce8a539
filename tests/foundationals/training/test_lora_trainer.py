"""LoRA training: the loss falls, runs repeat exactly, resume is bit-identical, files load in diffusers and ours.

Everything runs on tiny random models (nodes.demo's `tiny_sd15`, a tiny SDXL) and a synthetic 64x64
dataset, on the CPU in fp32. Torch runs single-threaded here: on 2 shared cores, small ops with 2 threads
are up to 100x slower when other processes compete.
"""

import json
import warnings

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from foundationals.clip.config import CLIPTextConfig
from foundationals.clip.text_encoder import CLIPTextEncoder
from foundationals.latent_diffusion.adapters.lora import SDLoraManager
from foundationals.latent_diffusion.auto_encoder import LatentDiffusionAutoencoder
from foundationals.latent_diffusion.model_config import TINY_8X_AUTOENCODER, TINY_SDXL_UNET
from foundationals.latent_diffusion.stable_diffusion import StableDiffusion
from foundationals.latent_diffusion.unet import UNet
from foundationals.training import (
    ConfigError,
    DatasetError,
    LoraOptions,
    LoraTrainer,
    TrainingError,
    TrainingOptions,
    load_config,
    load_image_folder,
    parse_config,
    train_lora,
)
from foundationals.training.dataset import aspect_buckets, nearest_bucket
from nodes.demo import tiny_sd15
from tests.support.tiny_training import CAPTIONS, write_tiny_dataset

warnings.filterwarnings("ignore")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    return tiny_sd15()


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    return load_image_folder(write_tiny_dataset(tmp_path_factory.mktemp("data")), resolution=64)


LORA = LoraOptions(rank=4, alpha=2.0)
TRAINING = TrainingOptions(steps=50, batch_size=2, learning_rate=1e-2, seed=7)


def state_of(model):
    return {
        name: tensor.clone()
        for part in (model.unet, model.text_encoder, model.autoencoder)
        for name, tensor in part.state_dict().items()
    }


def lora_weights(trainer):
    return {name: tensor.detach().clone() for name, tensor in trainer.lora_state_dict().items()}


# -- Learning, determinism, resume -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def fifty_steps(model, examples):
    """Two uninterrupted 50-step runs on the same model: losses and final LoRA weights of each."""
    runs = []
    for _ in range(2):
        with LoraTrainer(model, examples, LORA, TRAINING) as trainer:
            runs.append((trainer.train(), lora_weights(trainer)))
    return runs


def test_loss_decreases_over_fifty_seeded_steps(fifty_steps):
    losses, _ = fifty_steps[0]
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert len(losses) == 50
    # measured: 10-step means 1.27, 1.24, 1.19, 1.06, 0.99
    assert last < 0.85 * first, (first, last)


def test_two_runs_with_one_seed_give_identical_losses_and_weights(fifty_steps):
    (losses_a, weights_a), (losses_b, weights_b) = fifty_steps
    assert losses_a == losses_b
    assert all(torch.equal(weights_a[name], weights_b[name]) for name in weights_a)


def test_resume_from_step_25_ends_bit_identical_to_an_uninterrupted_run(
    model, examples, fifty_steps, tmp_path
):
    half = TrainingOptions(**{**TRAINING.__dict__, "steps": 25})
    with LoraTrainer(model, examples, LORA, half) as trainer:
        trainer.train(checkpoint_every=25, checkpoint_folder=tmp_path)
    checkpoint = tmp_path / "checkpoint-000025.pt"
    assert checkpoint.is_file()
    with LoraTrainer(model, examples, LORA, TRAINING) as trainer:
        trainer.load_checkpoint(checkpoint)
        assert trainer.step == 25
        losses = trainer.train()
        resumed = lora_weights(trainer)
    expected_losses, expected = fifty_steps[0]
    assert losses == expected_losses
    assert all(torch.equal(resumed[name], expected[name]) for name in expected)


def test_checkpoint_of_other_settings_is_refused(model, examples, tmp_path):
    with LoraTrainer(model, examples, LORA, TrainingOptions(steps=1, batch_size=2)) as trainer:
        trainer.train()
        path = trainer.save_checkpoint(tmp_path / "c.pt")
    with LoraTrainer(model, examples, LoraOptions(rank=2), TrainingOptions(steps=1)) as trainer:
        with pytest.raises(TrainingError, match=r"other settings \(batch_size, rank differ\)"):
            trainer.load_checkpoint(path)


def test_training_leaves_the_model_bit_identical_even_when_interrupted(model, examples):
    before, tree, flags = (
        state_of(model),
        repr(model.unet),
        [p.requires_grad for p in model.unet.parameters()],
    )

    def stop(progress):
        if progress.step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        with LoraTrainer(model, examples, LoraOptions(rank=2, text_encoder=True), TRAINING) as trainer:
            trainer.train(callback=stop)
    after = state_of(model)
    assert repr(model.unet) == tree and before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert [p.requires_grad for p in model.unet.parameters()] == flags


# -- The file: kohya layout, metadata, loaded by diffusers and by us --------------------------------------


@pytest.fixture(scope="module")
def trained_file(model, examples, tmp_path_factory):
    """20 steps on UNet attention + text-encoder attention, saved in fp32; our adapted outputs kept."""
    from tests.support.tiny_training import unet_inputs

    folder = tmp_path_factory.mktemp("lora")
    options = TrainingOptions(steps=20, batch_size=2, learning_rate=2e-2, seed=1)
    with LoraTrainer(model, examples, LoraOptions(rank=4, alpha=8.0, text_encoder=True), options) as trainer:
        trainer.train()
        path = trainer.save_lora(folder / "trained.safetensors", dtype="float32")
        x, t, context = unet_inputs()
        tokens = torch.randint(0, 49407, (2, 77), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            model.unet.set_timestep(t)
            model.unet.set_clip_text_embedding(context)
            unet_output = model.unet(x)
            text_output = model.text_encoder(tokens)
    return path, (x, t, context, tokens), unet_output, text_output


def test_saved_file_has_kohya_names_alphas_and_metadata(trained_file):
    path, *_ = trained_file
    with safe_open(str(path), framework="pt") as handle:
        keys, metadata = set(handle.keys()), handle.metadata()
        alpha = handle.get_tensor(
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha"
        )
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_out_0.lora_down.weight" in keys
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in keys
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in keys)
    assert float(alpha) == 8.0
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "8.0"
    assert metadata["ss_base_model_version"] == "sd_v1" and metadata["ss_steps"] == "20"
    assert json.loads(metadata["fluxion_unet_targets"]) == ["to_q", "to_k", "to_v", "to_out.0"]


def test_saved_file_loaded_by_diffusers_load_lora_weights_gives_our_outputs(model, trained_file):
    from tests.support.tiny_training import diffusers_pipeline_from_ours

    path, (x, t, context, tokens), unet_output, text_output = trained_file
    pipe = diffusers_pipeline_from_ours(model)
    with torch.no_grad():
        base = pipe.unet(x, t, context).sample
        model.unet.set_timestep(t)
        model.unet.set_clip_text_embedding(context)
        assert (base - model.unet(x)).abs().max() < 5e-5  # same base weights
    pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="trained")
    with torch.no_grad():
        theirs = pipe.unet(x, t, context).sample
        theirs_text = pipe.text_encoder(tokens).last_hidden_state
    assert (theirs - base).abs().max() > 1e-2  # the LoRA changes the output
    assert (theirs - unet_output).abs().max() < 5e-5  # fp32 rounding; measured 1.6e-5 on outputs of ~0.6
    assert (theirs_text - text_output).abs().max() < 1e-5


def test_saved_file_loaded_by_our_lora_manager_gives_the_trained_outputs(model, trained_file):
    path, (x, t, context, tokens), unet_output, text_output = trained_file
    manager = SDLoraManager.for_models(model.unet, model.text_encoder)
    report = manager.add_loras("trained", path, strict=True)
    try:
        assert report.not_applied == [] and report.applied_count == 88 + 12
        with torch.no_grad():
            model.unet.set_timestep(t)
            model.unet.set_clip_text_embedding(context)
            assert (model.unet(x) - unet_output).abs().max() < 1e-5
            assert (model.text_encoder(tokens) - text_output).abs().max() < 1e-5
    finally:
        manager.clear()


def test_sdxl_lora_uses_ldm_unet_names_and_te1_te2_and_loads_back(examples, tmp_path):
    torch.manual_seed(0)
    sdxl = StableDiffusion(
        UNet(TINY_SDXL_UNET),
        LatentDiffusionAutoencoder(TINY_8X_AUTOENCODER),
        CLIPTextEncoder(CLIPTextConfig(embedding_dim=32, num_layers=2, num_heads=4, feedforward_dim=37)),
        CLIPTextEncoder(
            CLIPTextConfig(
                embedding_dim=16,
                num_layers=2,
                num_heads=2,
                feedforward_dim=24,
                activation="gelu",
                projection_dim=40,
            )
        ),
    )
    path, losses = train_lora(
        sdxl,
        examples,
        tmp_path / "xl.safetensors",
        LoraOptions(rank=2, text_encoder=True),
        TrainingOptions(steps=2, batch_size=2, learning_rate=1e-2),
        save_dtype="float32",
    )
    assert len(losses) == 2
    with safe_open(str(path), framework="pt") as handle:
        keys, metadata = set(handle.keys()), handle.metadata()
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight" in keys
    assert "lora_unet_middle_block_1_transformer_blocks_1_attn1_to_q.lora_up.weight" in keys
    assert "lora_te1_text_model_encoder_layers_1_self_attn_v_proj.alpha" in keys
    assert "lora_te2_text_model_encoder_layers_0_self_attn_out_proj.lora_down.weight" in keys
    assert not any("down_blocks" in key for key in keys)
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    manager = SDLoraManager.for_models(sdxl.unet, sdxl.text_encoder, sdxl.text_encoder_2)
    report = manager.add_loras("xl", path, strict=True)
    assert report.not_applied == [] and report.applied_count == len(keys) // 3
    manager.clear()


# -- Dataset -------------------------------------------------------------------------------------------------


def test_images_go_to_the_nearest_aspect_bucket_and_captions_are_read(tmp_path):
    folder = write_tiny_dataset(tmp_path / "data")
    Image.new("RGB", (200, 100), "white").save(folder / "wide.png")  # no caption file: empty caption
    examples = load_image_folder(folder, resolution=64, bucket_step=32, max_aspect_ratio=3.0)
    assert [e.caption for e in examples] == [*CAPTIONS, ""]
    assert examples[-1].size == (32, 96) and examples[-1].original_size == (100, 200)
    assert examples[0].image.shape == (3, 64, 64)
    assert nearest_bucket(768, 512, aspect_buckets(512)) == (640, 384)


def test_unreadable_image_and_missing_folder_are_named(tmp_path):
    folder = write_tiny_dataset(tmp_path / "data")
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DatasetError, match=r"broken\.jpg: cannot be read as an image"):
        load_image_folder(folder, resolution=64)
    with pytest.raises(DatasetError, match=r"nowhere does not exist"):
        load_image_folder(tmp_path / "nowhere")


def test_sizes_the_model_cannot_take_are_refused(model, tmp_path):
    Image.new("RGB", (48, 48)).save(tmp_path / "a.png")
    examples = load_image_folder(tmp_path, resolution=48, bucket_step=16)
    with pytest.raises(TrainingError, match=r"a\.png: size 48x48 is not a multiple of 32"):
        LoraTrainer(model, examples)


def test_unknown_targets_are_refused(model, examples):
    with pytest.raises(TrainingError, match=r"no layer matches the LoRA targets \['to_z'\]"):
        LoraTrainer(model, examples, LoraOptions(unet_targets=["to_z"]))


# -- Config --------------------------------------------------------------------------------------------------

MINIMAL = {
    "model": {"checkpoint": "m.safetensors"},
    "dataset": {"folder": "data"},
    "output": {"file": "o.safetensors"},
}


def test_config_reads_every_section_and_resolves_paths(tmp_path):
    path = tmp_path / "train.toml"
    path.write_text(
        '[model]\ncheckpoint = "ckpt.safetensors"\n[lora]\nrank = 8\nalpha = 4\n'
        '[dataset]\nfolder = "images"\nresolution = 768\n[training]\nsteps = 10\nlearning_rate = 1e-3\n'
        '[checkpointing]\nevery = 5\n[output]\nfile = "out/my.safetensors"\n',
        encoding="utf-8",
    )
    config = load_config(path)
    assert config.lora.rank == 8 and config.lora.alpha == 4.0 and config.training.steps == 10
    assert config.model.checkpoint == str(tmp_path / "ckpt.safetensors")
    assert config.checkpointing.save_folder == str(tmp_path / "checkpoints")
    assert config.output.file == str(tmp_path / "out" / "my.safetensors")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"lora": {"rnak": 4}}, r"\[lora\] has unknown key 'rnak'; allowed keys: rank, alpha, unet_targets"),
        ({"trainig": {}}, r"unknown section \[trainig\]; allowed sections: model, lora, dataset, training"),
        ({"training": {"steps": "ten"}}, r"\[training\] steps must be an integer, got 'ten'"),
        ({"training": {"steps": 0}}, r"\[training\] steps must be at least 1, got 0"),
        (
            {"training": {"mixed_precision": "fp8"}},
            r"mixed_precision must be one of no, bf16, fp16, got 'fp8'",
        ),
        ({"lora": {"unet_targets": "to_q"}}, r"\[lora\] unet_targets must be a list of strings"),
        ({"output": {"file": ""}}, r"\[output\] file is required"),
        ({"sampling": {"every": 10}}, r"\[sampling\] every is set but prompts is empty"),
    ],
)
def test_bad_configs_name_the_section_and_key(change, message):
    values = {
        **MINIMAL,
        **{section: {**MINIMAL.get(section, {}), **keys} for section, keys in change.items()},
    }
    with pytest.raises(ConfigError, match=message):
        parse_config(values)


def test_config_file_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[lora\nrank = 4", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad\.toml: not valid TOML"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"missing\.toml: no such config file"):
        load_config(tmp_path / "missing.toml")


def test_bare_checkpoint_and_lora_names_live_in_the_models_folders(tmp_path):
    models = tmp_path / "models"
    (models / "diffusers" / "sd15").mkdir(parents=True)  # a diffusers folder, found after checkpoints/

    def folders(kind):
        return [models / kind]

    values = {**MINIMAL, "model": {"checkpoint": "sd15"}}
    config = parse_config(values, tmp_path / "configs", folders)
    assert config.model.checkpoint == str(models / "diffusers" / "sd15")
    assert config.output.file == str(models / "loras" / "o.safetensors")
    assert config.dataset.folder == str(tmp_path / "configs" / "data")
    beside = {**MINIMAL, "model": {"checkpoint": "./m.safetensors"}, "output": {"file": "./o.safetensors"}}
    config = parse_config(beside, tmp_path / "configs", folders)
    assert config.model.checkpoint == str(tmp_path / "configs" / "m.safetensors")
    assert config.output.file == str(tmp_path / "configs" / "o.safetensors")
    with pytest.raises(ConfigError, match=r"\[model\] checkpoint 'm.safetensors' is not in .*checkpoints"):
        parse_config(MINIMAL, tmp_path / "configs", folders)
    (models / "m.safetensors").touch()  # directly in models/, not in models/checkpoints/
    with pytest.raises(ConfigError) as caught:
        parse_config(MINIMAL, tmp_path / "configs", folders)
    assert f"; it is at {models / 'm.safetensors'}: move it into {models / 'checkpoints'} (" in str(
        caught.value
    )
