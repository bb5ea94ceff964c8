"""Vision task: matplotlib sample-image patches (coap_lab.data.images) and the DDPM UNet."""

from __future__ import annotations

import gzip
import math

import numpy as np
import pytest
import torch

from coap_lab.data.images import (
    SAMPLE_IMAGES,
    ImageDataError,
    image_grid,
    load_patches,
    load_sample_image,
)
from coap_lab.models.unet import (
    DDPMSchedule,
    UNetConfig,
    build_unet,
    conv_weights_above_threshold,
    ddpm_loss,
    ddpm_sample,
    demo_unet_config,
    denoise_one_step,
    smoke_unet_config,
    tiny_unet_config,
)


@pytest.fixture(scope="module")
def patches():
    return load_patches(size=16, max_side=96)


# ---------------------------------------------------------------------------------------- data


def test_default_images_without_matplotlib_say_how_to_get_it(monkeypatch):
    """The default images come with matplotlib (the ``demo`` extra); without it, one clear error."""
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.cbook", None)
    with pytest.raises(ImageDataError, match=r"matplotlib, which is not installed; .*coap-compile\[demo\]"):
        load_sample_image("grace_hopper.jpg")
    from coap_lab.cli.report import pyplot

    with pytest.raises(ModuleNotFoundError, match=r"plotting needs matplotlib.*coap-compile\[demo\]"):
        pyplot()


@pytest.mark.parametrize("name", SAMPLE_IMAGES)
@pytest.mark.parametrize("channels", [1, 3])
def test_every_sample_image_loads(name, channels):
    img = load_sample_image(name, channels=channels)
    assert img.ndim == (2 if channels == 1 else 3) and img.shape[:2] >= (64, 64)
    assert img.min() == 0.0 and img.max() == 1.0  # min-max scaled


def test_patch_shapes_range_and_sources(patches):
    assert patches.sources == SAMPLE_IMAGES
    assert patches.train.shape[1:] == (1, 16, 16) and patches.val.shape[1:] == (1, 16, 16)
    assert patches.train.dtype == torch.float32
    assert len(patches.train) > 100 and len(patches.val) >= len(SAMPLE_IMAGES)
    for t in (patches.train, patches.val):
        assert float(t.min()) >= -1.0 and float(t.max()) <= 1.0
    assert max(max(s) for s in patches.image_shapes) == 96  # downscaled to the longest side
    rgb = load_patches(size=16, channels=3, max_side=64, images=("grace_hopper.jpg",))
    assert rgb.train.shape[1] == 3 and not torch.equal(rgb.train[:, 0], rgb.train[:, 1])


def test_patches_are_deterministic_and_seeded(patches):
    again = load_patches(size=16, max_side=96)
    assert torch.equal(again.train, patches.train) and torch.equal(again.val_origins, patches.val_origins)
    other = load_patches(size=16, max_side=96, seed=1)
    assert not torch.equal(other.val_origins, patches.val_origins)


def test_split_is_pixel_disjoint_and_patches_are_the_crops(patches):
    size = 16
    for index, (h, w) in enumerate(patches.image_shapes):
        used = {"train": torch.zeros(h, w, dtype=torch.bool), "val": torch.zeros(h, w, dtype=torch.bool)}
        canvas = torch.full((h, w), float("nan"))
        for split, data, origins in (
            ("train", patches.train, patches.train_origins),
            ("val", patches.val, patches.val_origins),
        ):
            for patch, (i, y, x) in zip(data, origins.tolist()):
                if i != index:
                    continue
                used[split][y : y + size, x : x + size] = True
                # Overlapping windows must agree where they overlap: they are crops of one image.
                region = canvas[y : y + size, x : x + size]
                known = ~region.isnan()
                assert torch.equal(region[known], patch[0][known])
                canvas[y : y + size, x : x + size] = patch[0]
        assert not (used["train"] & used["val"]).any(), f"image {index}: a pixel is in train and val"
        assert used["val"].any() and used["train"].any()


def test_missing_image_names_the_file(tmp_path):
    with pytest.raises(ImageDataError, match=r"'grace_hopper\.jpg' not found at .*grace_hopper\.jpg"):
        load_patches(root=tmp_path, images=("grace_hopper.jpg",))


@pytest.mark.parametrize(
    ("name", "payload"),
    [
        ("grace_hopper.jpg", b"not a jpeg"),
        ("s1045.ima.gz", b"not gzip"),
        ("s1045.ima.gz", gzip.compress(b"\x00" * 6)),  # 3 uint16 values: not a square image
        ("topobathy.npz", b"PK broken"),
    ],
)
def test_unreadable_image_names_the_file(tmp_path, name, payload):
    (tmp_path / name).write_bytes(payload)
    with pytest.raises(ImageDataError, match=rf"cannot read sample image '{name}' at "):
        load_sample_image(name, root=tmp_path)


def test_constant_image_and_bad_settings_are_refused(tmp_path):
    np.savez(tmp_path / "topobathy.npz", topo=np.zeros((40, 40), dtype=np.float32))
    with pytest.raises(ImageDataError, match="constant"):
        load_sample_image("topobathy.npz", root=tmp_path)
    with pytest.raises(ValueError, match="channels"):
        load_sample_image("grace_hopper.jpg", channels=2)
    with pytest.raises(ValueError, match="val_fraction"):
        load_patches(val_fraction=1.0)
    with pytest.raises(ValueError, match="size"):
        load_patches(size=1)
    with pytest.raises(ImageDataError, match="smaller than size=100"):
        load_patches(size=100, max_side=None, images=("topobathy.npz",))  # 91×120
    with pytest.raises(ImageDataError, match="no training patch left"):
        load_patches(size=64, max_side=None, images=("topobathy.npz",))  # its one tile is held out


def test_image_grid_layout(patches):
    rows = [patches.val[:3], patches.val[:3] * 0, patches.val[:3].clamp(min=0)]
    grid = image_grid(rows, pad=2)
    assert grid.shape == (3 * 18 + 2, 3 * 18 + 2, 3)
    assert grid.min() >= 0 and grid.max() <= 1
    np.testing.assert_allclose(grid[2:18, 2:18, 0], ((patches.val[0, 0] + 1) / 2).numpy(), atol=1e-6)


# ----------------------------------------------------------------------------------------- model


def test_unet_forward_backward_tiny(one_thread):
    model = build_unet(tiny_unet_config())
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    out = model(x, torch.tensor([0, 500, 999]))
    assert out.shape == x.shape
    out.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert conv_weights_above_threshold(model) == []
    with pytest.raises(ValueError, match="divisible by 2"):
        model(torch.zeros(1, 1, 15, 16), torch.zeros(1))


def test_default_unet_conv_weights_above_tucker_threshold():
    model = build_unet(UNetConfig(), device="meta")
    big = dict(conv_weights_above_threshold(model))
    three = [s for s in big.values() if s[2:] == (3, 3)]
    one = [s for s in big.values() if s[2:] == (1, 1)]
    # 2 blocks × 2 convs + downsample + mid 2 + upsample (3×3), decoder skips 128×256, 64×192 (1×1)
    assert len(three) == 12 and sorted(one) == [(64, 192, 1, 1), (128, 256, 1, 1)]
    assert big["down.0.conv1.weight"] == (64, 64, 3, 3)  # 36,864 weights
    assert all(np.prod(s) > 9216 for s in big.values())
    small = {n for n, p in model.named_parameters() if p.ndim == 4} - set(big)
    assert small == {"conv_in.weight", "conv_out.weight", "down.1.skip.weight"}  # 576, 576, 8192


def test_smoke_and_demo_configs_have_tucker_candidates():
    smoke = dict(conv_weights_above_threshold(build_unet(smoke_unet_config(), device="meta")))
    assert sorted(smoke.values()) == [(64, 64, 3, 3)] * 5 + [(64, 128, 3, 3)]
    demo = dict(conv_weights_above_threshold(build_unet(demo_unet_config(), device="meta")))
    assert len(demo) == 13 and demo["up.0.skip.weight"] == (96, 192, 1, 1)
    assert min(np.prod(s) for s in demo.values() if s[2:] == (3, 3)) == 48 * 48 * 9


def test_build_is_seeded_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b = build_unet(tiny_unet_config(), seed=3), build_unet(tiny_unet_config(), seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_schedule_closed_form_and_inverse():
    sched = DDPMSchedule(num_steps=50, beta_start=1e-3, beta_end=0.1)
    betas = np.linspace(1e-3, 0.1, 50)
    np.testing.assert_allclose(sched.alpha_bars.numpy(), np.cumprod(1 - betas), rtol=1e-12)
    x0 = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    noise = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    t = torch.tensor([0, 10, 30, 49])
    xt = sched.q_sample(x0, t, noise)
    ab = torch.tensor(np.cumprod(1 - betas))[t].view(-1, 1, 1, 1)
    assert torch.allclose(xt, ab.sqrt() * x0 + (1 - ab).sqrt() * noise, atol=1e-14)
    assert torch.allclose(sched.predict_x0(xt, t, noise), x0, atol=1e-12)
    with pytest.raises(ValueError, match="beta_start"):
        DDPMSchedule(beta_start=0.1, beta_end=0.01)


@pytest.fixture
def one_thread():
    """Small convolutions: 1 thread runs ~30 ms per tiny step here, 2 threads on a shared, loaded
    2-core machine spun for 0.2–5 s per step (measured); the autouse fixture restores 2 afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_loss_decreases_with_adamw_tiny(patches, one_thread):
    model = build_unet(tiny_unet_config())
    sched = DDPMSchedule()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)

    def val_loss() -> float:
        g = torch.Generator().manual_seed(123)  # the same t and ε every time
        with torch.no_grad():
            return sum(float(ddpm_loss(model, patches.val, sched, generator=g)) for _ in range(4)) / 4

    before = val_loss()
    for _ in range(30):
        idx = torch.randint(0, len(patches.train), (16,), generator=gen)
        loss = ddpm_loss(model, patches.train[idx], sched, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = val_loss()
    # observed 1.137 → 0.124 (tiny config, 16×16 patches); a model that cannot fit ε would not halve it
    assert after < 0.5 * before, (before, after)


def test_denoise_and_sample_shapes(one_thread):
    model = build_unet(tiny_unet_config())
    x0 = torch.rand(2, 1, 8, 8) * 2 - 1
    xt, x0_hat = denoise_one_step(model, x0, DDPMSchedule(), 300, generator=torch.Generator().manual_seed(0))
    assert xt.shape == x0_hat.shape == x0.shape and float(x0_hat.abs().max()) <= 1
    s = ddpm_sample(
        model, DDPMSchedule(num_steps=5), (2, 1, 8, 8), generator=torch.Generator().manual_seed(0)
    )
    assert s.shape == (2, 1, 8, 8) and torch.isfinite(s).all()
    # closed form with ε_θ = 0 and T = 2: x = (z₀/√(1−β₁) + √β₁ z₁)/√(1−β₀), clamped
    sched = DDPMSchedule(num_steps=2, beta_start=0.1, beta_end=0.3)
    got = ddpm_sample(
        lambda x, t: torch.zeros_like(x), sched, (3, 1, 4, 4), generator=torch.Generator().manual_seed(5)
    )
    g = torch.Generator().manual_seed(5)
    z0, z1 = torch.randn(3, 1, 4, 4, generator=g), torch.randn(3, 1, 4, 4, generator=g)
    expect = ((z0 / math.sqrt(1 - 0.3) + math.sqrt(0.3) * z1) / math.sqrt(1 - 0.1)).clamp(-1, 1)
    assert torch.allclose(got, expect, atol=1e-6)
    with pytest.raises(ValueError, match="t must be"):
        denoise_one_step(model, x0, DDPMSchedule(), 1000, generator=torch.Generator())
