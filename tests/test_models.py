import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gan.models as models_module
from gan.config import VARIANTS, ModelConfig
from gan.models import (
    CMHSA,
    USE,
    Discriminator,
    Encoder,
    Generator,
    build_models,
    count_parameters,
    init_weights,
)

SMALL = ModelConfig(nz=16, g_widths=(32, 16, 8, 8), d_widths=(8, 16, 32, 32), heads=4)
PAPER_G_WIDTHS = [(512, 256, 128, 64), (1024, 512, 256, 128), (2048, 1024, 512, 256)]


def small(variant: str, **changes) -> ModelConfig:
    return dataclasses.replace(SMALL, variant=variant, **changes)


def count(model: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_small_models_map_noise_to_images_and_images_to_logits(variant):
    models = build_models(small(variant))
    assert set(models) == ({"G", "D", "E"} if variant == "vae-gan" else {"G", "D"})
    images = models["G"](torch.randn(5, 16))
    assert images.shape == (5, 3, 64, 64)
    assert images.abs().max() <= 1.0
    assert models["D"](images).shape == (5,)
    logit, features = models["D"](images, return_features=True)
    assert logit.shape == (5,) and features.shape == (5, 32, 4, 4)
    if variant == "vae-gan":
        mu, logvar = models["E"](images)
        assert mu.shape == (5, 16) and logvar.shape == (5, 16)


@pytest.mark.parametrize("g_widths", PAPER_G_WIDTHS, ids=lambda w: f"g{w[0]}")
@pytest.mark.parametrize("variant", VARIANTS)
def test_paper_widths_generate_64x64_images(variant, g_widths):
    cfg = ModelConfig(variant=variant, g_widths=g_widths)
    models = build_models(cfg)
    with torch.no_grad():
        images = models["G"].eval()(torch.randn(2, cfg.nz))
        logits = models["D"].eval()(images)
    assert images.shape == (2, 3, 64, 64)
    assert images.abs().max() <= 1.0
    assert logits.shape == (2,)


def test_generator_has_five_transposed_convs_for_64x64():
    generator = Generator(small("dcgan"))
    assert count(generator, nn.ConvTranspose2d) == 5
    assert count(generator, nn.BatchNorm2d) == 4  # every transposed conv but the to-RGB one


# ---- USE ----


def test_use_channel_weights_follow_eqs_3_1_to_3_2_and_lie_in_open_unit_interval():
    use = USE(8, 4)
    x = torch.randn(3, 8, 5, 5) * 3
    z = x.mean(dim=(2, 3), keepdim=True)
    expected = torch.sigmoid(
        F.conv2d(F.relu(F.conv2d(z, use.reduce.weight, use.reduce.bias)), use.expand.weight, use.expand.bias)
    )
    weights = use.channel_weights(x)
    assert use.reduce.out_channels == 4  # C -> C/2
    assert weights.shape == (3, 8, 1, 1)
    torch.testing.assert_close(weights, expected)
    assert (weights > 0).all() and (weights < 1).all()


def test_use_output_is_transposed_conv_of_reweighted_input():
    use = USE(8, 4)
    x = torch.randn(3, 8, 5, 5)
    reweighted = x * use.channel_weights(x)  # eq 3.3
    y = use(x)
    assert y.shape == (3, 4, 10, 10)
    torch.testing.assert_close(y, F.conv_transpose2d(reweighted, use.upsample.weight, stride=2, padding=1))


def test_use_rejects_single_channel_input():
    with pytest.raises(ValueError, match="in_ch=1"):
        USE(1, 4)


# ---- CMHSA ----


def test_cmhsa_attention_is_scaled_softmax_over_keys():
    attention = CMHSA(8, heads=2, dropout=0.0).eval()
    x = torch.randn(2, 8, 3, 4)
    _, attn = attention(x, return_attention=True)
    assert attn.shape == (2, 2, 12, 12)
    torch.testing.assert_close(attn.sum(dim=-1), torch.ones(2, 2, 12))
    w, b = attention.qkv.weight, attention.qkv.bias  # output channels: Q (0-7), K (8-15), V (16-23)
    q = F.conv2d(x, w[:8], b[:8]).reshape(2, 2, 4, 12)
    k = F.conv2d(x, w[8:16], b[8:16]).reshape(2, 2, 4, 12)
    scores = torch.einsum("bhdi,bhdj->bhij", q, k) / 4**0.5  # eqs 3.5, 3.7: head_dim = 8 / 2
    torch.testing.assert_close(attn, scores.softmax(dim=-1))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_cmhsa_with_zero_out_proj_is_identity(training):
    attention = CMHSA(8, heads=4, dropout=0.5).train(training)
    nn.init.zeros_(attention.out_proj.weight)
    nn.init.zeros_(attention.out_proj.bias)
    x = torch.randn(2, 8, 4, 4)
    torch.testing.assert_close(attention(x), x)


def test_cmhsa_explicit_path_matches_sdpa_path_in_eval():
    attention = CMHSA(16, heads=4, dropout=0.3).eval()
    x = torch.randn(2, 16, 8, 8)
    explicit, _ = attention(x, return_attention=True)
    torch.testing.assert_close(explicit, attention(x))


@pytest.mark.parametrize("return_attention", [False, True], ids=["sdpa", "explicit"])
def test_cmhsa_attention_dropout_only_in_training(return_attention):
    attention = CMHSA(8, heads=2, dropout=0.5)
    x = torch.randn(2, 8, 4, 4)

    def output():
        y = attention(x, return_attention=return_attention)
        return y[0] if return_attention else y

    attention.train()
    assert not torch.allclose(output(), output())
    attention.eval()
    torch.testing.assert_close(output(), output())


MEMORY_FORMATS = [torch.contiguous_format, torch.channels_last]


@pytest.mark.parametrize("memory_format", MEMORY_FORMATS, ids=["contiguous", "channels_last"])
def test_cmhsa_hands_sdpa_unit_stride_q_k_v_in_both_memory_formats(monkeypatch, memory_format):
    """Flash, memory-efficient and cuDNN attention need stride 1 along head_dim; torch silently falls back to
    the math kernel otherwise. Checked on what CMHSA really passes to F.scaled_dot_product_attention."""
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append([(tuple(t.shape), t.stride(-1), t.is_contiguous()) for t in (q, k, v)])
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(models_module.F, "scaled_dot_product_attention", spy)
    attention = CMHSA(16, heads=4, dropout=0.1).to(memory_format=memory_format)
    x = torch.randn(2, 16, 8, 8).contiguous(memory_format=memory_format)
    y = attention(x)
    assert seen == [[((2, 4, 64, 4), 1, True)] * 3]
    assert y.is_contiguous(memory_format=memory_format)  # the output keeps the input's layout


@pytest.mark.parametrize("memory_format", MEMORY_FORMATS, ids=["contiguous", "channels_last"])
def test_cmhsa_outputs_agree_across_memory_formats_and_paths(memory_format):
    attention = CMHSA(16, heads=4, dropout=0.3).eval()
    x = torch.randn(2, 16, 8, 8)
    reference = attention(x)
    attention = attention.to(memory_format=memory_format)
    x = x.contiguous(memory_format=memory_format)
    explicit, _ = attention(x, return_attention=True)
    torch.testing.assert_close(attention(x), reference)
    torch.testing.assert_close(explicit, reference)


def legacy_cmhsa_state(state: dict) -> dict:
    """A CMHSA state_dict as written before q, k and v became one convolution (separate query/key/value)."""
    old = {}
    for key, tensor in state.items():
        if key.startswith("qkv."):
            kind = key.split(".", 1)[1]
            for name, part in zip(("query", "key", "value"), tensor.chunk(3), strict=True):
                old[f"{name}.{kind}"] = part.clone()
        else:
            old[key] = tensor
    return old


def test_cmhsa_loads_a_state_dict_of_the_old_separate_q_k_v_layout():
    attention = CMHSA(8, heads=2, dropout=0.0).eval()
    nn.init.normal_(attention.qkv.bias)  # distinct biases per part, so a wrong order would show
    old = legacy_cmhsa_state(attention.state_dict())
    assert {"query.weight", "key.bias", "value.weight"} <= set(old) and "qkv.weight" not in old
    loaded = CMHSA(8, heads=2, dropout=0.0).eval()
    loaded.load_state_dict(old)  # strict: no missing or unexpected keys
    x = torch.randn(2, 8, 4, 4)
    assert torch.equal(loaded(x), attention(x))
    generator = Generator(small("use-cmhsa-gan")).eval()
    legacy = {}
    for key, tensor in generator.state_dict().items():  # the same, nested inside a generator
        prefix, _, rest = key.partition("qkv.")
        if rest:
            legacy.update({f"{prefix}{name}.{rest}": part for name, part in
                           zip(("query", "key", "value"), tensor.chunk(3), strict=True)})
        else:
            legacy[key] = tensor
    fresh = Generator(small("use-cmhsa-gan")).eval()
    fresh.load_state_dict(legacy)
    z = torch.randn(2, 16)
    assert torch.equal(fresh(z), generator(z))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fused attention kernels need CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("memory_format", MEMORY_FORMATS, ids=["contiguous", "channels_last"])
def test_cmhsa_runs_a_fused_attention_kernel_on_cuda(dtype, memory_format):
    """With only the fused kernels allowed, a fallback to the math kernel is an error, not a slowdown."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    attention = CMHSA(128, heads=4, dropout=0.1).cuda().to(memory_format=memory_format).train()
    x = torch.randn(8, 128, 16, 16, device="cuda").contiguous(memory_format=memory_format).requires_grad_()
    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    with sdpa_kernel(fused), torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        attention(x).float().square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_cmhsa_heads_must_divide_channels():
    with pytest.raises(ValueError, match=r"heads=3.*channels=128"):
        CMHSA(128, heads=3, dropout=0.1)


def test_cmhsa_generator_reports_bad_heads_for_its_placement():
    with pytest.raises(ValueError, match=r"heads=3.*channels=8"):
        Generator(small("cmhsa-gan", heads=3))


# ---- variant structure and placement ----


@pytest.mark.parametrize(
    "variant, uses, attentions",
    [("dcgan", 0, 0), ("use-gan", 1, 0), ("cmhsa-gan", 0, 1), ("use-cmhsa-gan", 1, 1), ("wgan", 0, 0),
     ("vae-gan", 0, 0)],
)
def test_generator_has_the_variants_modules(variant, uses, attentions):
    generator = build_models(small(variant))["G"]
    assert count(generator, USE) == uses
    assert count(generator, CMHSA) == attentions


@pytest.mark.parametrize("use_at, cmhsa_at", [(32, 16), (8, 4), (16, 32)])
def test_modules_sit_at_the_configured_resolutions(use_at, cmhsa_at):
    generator = Generator(small("use-cmhsa-gan", use_at=use_at, cmhsa_at=cmhsa_at))
    seen = {}
    for module in generator.modules():
        if isinstance(module, USE):
            module.register_forward_hook(lambda m, args, out: seen.update(use_out=out.shape[-1]))
        if isinstance(module, CMHSA):
            module.register_forward_hook(lambda m, args, out: seen.update(cmhsa_in=args[0].shape[-1]))
    generator(torch.randn(2, 16))
    assert seen == {"use_out": use_at, "cmhsa_in": cmhsa_at}


def test_use_keeps_batchnorm_and_relu_after_it():
    layers = list(Generator(small("use-gan", use_at=16)).net)
    index = next(i for i, layer in enumerate(layers) if isinstance(layer, USE))
    assert isinstance(layers[index + 1], nn.BatchNorm2d) and isinstance(layers[index + 2], nn.ReLU)


def test_wgan_critic_normalises_each_sample_on_its_own():
    critic = build_models(small("wgan"))["D"].train()
    assert count(critic, nn.BatchNorm2d) == 0
    assert count(critic, nn.GroupNorm) == 3
    images = torch.randn(4, 3, 64, 64)
    # A sample's score must not depend on the rest of the batch (gradient penalty is per sample).
    torch.testing.assert_close(critic(images)[:1], critic(images[:1]))


def test_gan_discriminators_use_batchnorm_but_not_on_the_first_layer():
    discriminator = build_models(small("dcgan"))["D"]
    layers = list(discriminator.features)
    assert isinstance(layers[0], nn.Conv2d) and isinstance(layers[1], nn.LeakyReLU)
    assert count(discriminator, nn.BatchNorm2d) == 3


# ---- configuration errors ----


@pytest.mark.parametrize("use_at", [4, 64, 12])
def test_bad_use_placement_is_rejected(use_at):
    with pytest.raises(ValueError, match=rf"use_at={use_at}.*\[8, 16, 32\]"):
        Generator(small("use-gan", use_at=use_at))


@pytest.mark.parametrize("cmhsa_at", [2, 64])
def test_bad_cmhsa_placement_is_rejected(cmhsa_at):
    with pytest.raises(ValueError, match=rf"cmhsa_at={cmhsa_at}.*\[4, 8, 16, 32\]"):
        Generator(small("use-cmhsa-gan", cmhsa_at=cmhsa_at))


def test_placements_are_ignored_by_variants_without_the_module():
    assert count(Generator(small("dcgan", use_at=5, cmhsa_at=5)), nn.ConvTranspose2d) == 5


@pytest.mark.parametrize("model", [Generator, Discriminator, Encoder])
def test_width_count_must_match_image_size(model):
    cfg = small("vae-gan", g_widths=(32, 16, 8), d_widths=(8, 16, 32))
    with pytest.raises(ValueError, match=r"needs 4 widths for image_size=64, got 3"):
        model(cfg)


def test_width_count_follows_image_size():
    cfg = small("use-cmhsa-gan", g_widths=(32, 16, 8), d_widths=(8, 16, 32), image_size=32, use_at=16, cmhsa_at=8)
    models = build_models(cfg)
    images = models["G"](torch.randn(2, 16))
    assert images.shape == (2, 3, 32, 32)
    assert models["D"](images).shape == (2,)


def test_image_size_must_be_a_power_of_two():
    with pytest.raises(ValueError, match="image_size must be a power of two >= 8, got 48"):
        Generator(small("dcgan", image_size=48))


def test_unknown_variant_lists_valid_names():
    with pytest.raises(ValueError, match="'stylegan'.*dcgan, use-gan, cmhsa-gan, use-cmhsa-gan, wgan, vae-gan"):
        build_models(small("stylegan"))


def test_unknown_norm_is_rejected():
    with pytest.raises(ValueError, match="unknown norm 'instance'"):
        Discriminator(SMALL, norm="instance")


# ---- initialisation, memory format, compile ----


def test_dcgan_initialisation():
    models = build_models(ModelConfig(variant="vae-gan", g_widths=(64, 32, 16, 8)))
    for model in models.values():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)) and module.weight.numel() >= 8192:
                assert module.weight.std().item() == pytest.approx(0.02, rel=0.05)
                assert abs(module.weight.mean().item()) < 0.002
            if isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
                assert (module.weight - 1).abs().max() < 0.2
            if getattr(module, "bias", None) is not None:
                assert (module.bias == 0).all()


def test_init_weights_overrides_pytorch_defaults():
    conv = nn.Conv2d(64, 64, 4)  # PyTorch default: kaiming-uniform, std ~0.018 but with a nonzero bias
    init_weights(conv)
    assert conv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert (conv.bias == 0).all()


def test_channels_last_gives_same_images():
    generator = Generator(small("use-cmhsa-gan")).eval()
    z = torch.randn(3, 16)
    expected = generator(z)
    generator = generator.to(memory_format=torch.channels_last)
    torch.testing.assert_close(generator(z), expected)


def test_generator_compiles_without_graph_breaks():
    generator = Generator(small("use-cmhsa-gan"))
    compiled = torch.compile(generator, backend="eager", fullgraph=True)
    assert compiled(torch.randn(2, 16)).shape == (2, 3, 64, 64)


def test_count_parameters():
    assert count_parameters(nn.Linear(3, 2)) == 8
    assert count_parameters(USE(8, 4)) == (8 * 4 + 4) + (4 * 8 + 8) + 8 * 4 * 16
