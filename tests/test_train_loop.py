"""The training loop's pieces against references: learning-rate schedules against diffusers' get_scheduler, the EMA
against diffusers' EMAModel, gradient checkpointing and channels-last kernels against the plain backward pass;
gradient accumulation, sample images with their infotext, the loss curve."""

from __future__ import annotations

import pytest
import torch
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from PIL import Image
from safetensors.torch import save_file

import sdlite
import sdlite.train
from sdlite.train.api import build_run
from sdlite.train.lora import LoraMethod
from sdlite.train.optim import EMA, channels_last_kernels, checkpointed_blocks, lr_scheduler
from sdlite.train.report import LogRow, draw_loss_curve
from sdlite.unet import UNetConfig, UNetModel

from conftest import randomize_, rel_err
from sdfiles import UNETS, build
from test_train_lora import write_images

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("schedule,theirs", [("constant", "constant_with_warmup"), ("linear", "linear"),
                                             ("cosine", "cosine")])
@pytest.mark.parametrize("warmup", [0, 3])
def test_lr_schedules_match_diffusers(schedule, theirs, warmup):
    def lrs(make):
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.AdamW([p], lr=0.1)
        sched = make(opt)
        out = []
        for _ in range(12):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    ours = lrs(lambda opt: lr_scheduler(opt, schedule, 12, warmup))
    ref = lrs(lambda opt: get_scheduler(theirs, opt, num_warmup_steps=warmup, num_training_steps=12))
    assert ours == pytest.approx(ref, abs=1e-12)


def test_ema_matches_diffusers_ema_model():
    p = torch.nn.Parameter(torch.randn(5))
    ours = EMA([("p", p)], decay=0.9)
    ref = EMAModel([p], decay=0.9)
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        with torch.no_grad():
            p.add_(torch.randn(5, generator=g))
        ours.update()
        ref.step([p])
    assert rel_err(ours.shadow["p"], ref.shadow_params[0]) < 1e-6
    with ours.swapped():
        assert torch.equal(p.detach(), ours.shadow["p"])
    assert not torch.equal(p.detach(), ours.shadow["p"])


def test_checkpointed_blocks_give_the_same_gradients():
    unet = randomize_(UNetModel(UNetConfig(**UNETS["sdxl"])), 2).train()
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 192, generator=g)
    y = torch.randn(2, unet.config.adm_in_channels, generator=g)

    def grads():
        unet.zero_grad()
        unet(x, torch.tensor([10, 700]), context, y=y).square().mean().backward()
        return {n: p.grad.clone() for n, p in unet.named_parameters()}

    plain = grads()
    with checkpointed_blocks(unet):
        checkpointed = grads()
    assert all(rel_err(checkpointed[n], plain[n]) < 1e-5 for n in plain)
    assert not any("forward" in vars(b) for b in [*unet.input_blocks, unet.middle_block, *unet.output_blocks])


def test_channels_last_kernels_give_the_same_gradients_and_restore_the_layout():
    unet = randomize_(UNetModel(UNetConfig(**UNETS["sd1"])), 2).train()
    unet.input_blocks.requires_grad_(False)  # as with LoRA: the first layers need no input gradient
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 128, generator=g)
    kernels = [m.weight for m in unet.modules() if isinstance(m, torch.nn.Conv2d)]

    def grads():
        unet.zero_grad()
        unet(x, torch.tensor([10, 700]), context).square().mean().backward()
        return {n: p.grad.clone() for n, p in unet.named_parameters() if p.requires_grad}

    plain = grads()
    with channels_last_kernels(unet):
        assert all(k.is_contiguous(memory_format=torch.channels_last) for k in kernels)
        ordered = grads()
    assert all(rel_err(ordered[n], plain[n]) < 1e-5 for n in plain)
    assert all(k.is_contiguous() for k in kernels)


def test_channels_last_kernels_release_the_mapped_file(pipe):
    """A loaded model's tensors are views of the mapped checkpoint; for the run every UNet tensor gets memory of its
    own (the mapping's pages would otherwise stay resident next to the kernels' copies), the same values."""
    unet = pipe.unet
    before = {n: (p.data_ptr(), p.detach().clone()) for n, p in unet.named_parameters()}
    with channels_last_kernels(unet):
        moved = {n: p.data_ptr() != before[n][0] and torch.equal(p, before[n][1]) for n, p in unet.named_parameters()}
    assert all(moved.values()), [n for n, ok in moved.items() if not ok][:5]
    assert all(torch.equal(p, before[n][1]) for n, p in unet.named_parameters())


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "m.safetensors"
    save_file(build("sd1", seed=3).state, str(path))
    return sdlite.load(path)


class SameEveryTime(LoraMethod):
    """Every sample's loss at the same noise and timestep: micro-batches of one and a batch of two see the same."""

    def loss(self, r, batch):
        g = torch.Generator().manual_seed(0)
        noise = torch.randn(batch.latents.shape[1:], generator=g).expand_as(batch.latents)
        context, y = r.condition(batch)
        t = torch.full((batch.latents.shape[0],), 300)
        return sdlite.train.denoising_loss(r.pipe, batch.latents, context, noise, t, y)


def test_gradient_accumulation_equals_the_larger_batch(pipe, tmp_path):
    folder = write_images(tmp_path / "data" / "2_thing", n=1)  # one image, two repeats: two identical examples
    common = dict(prompt="p", resolution=64, steps=2, lr=1e-2, max_grad_norm=None)
    accumulated = build_run(pipe, folder.parent, SameEveryTime(2, 2, save_precision="fp32"), tmp_path / "a.safetensors",
                            batch_size=1, grad_accum=2, **common).execute()
    batched = build_run(pipe, folder.parent, SameEveryTime(2, 2, save_precision="fp32"), tmp_path / "b.safetensors",
                        batch_size=2, grad_accum=1, **common).execute()
    assert accumulated.losses == pytest.approx(batched.losses, rel=1e-5)
    a, b = (sdlite.checkpoint.open_tensor_file(r.output) for r in (accumulated, batched))
    ups = sorted(k for k in a.keys() if "lora_up" in k)
    assert rel_err(torch.cat([a.read(k).flatten() for k in ups]), torch.cat([b.read(k).flatten() for k in ups])) < 1e-4
    # Per tensor the bound is looser: batch-of-1 and batch-of-2 convolutions sum in different orders, and Adam
    # divides each gradient entry by its own magnitude, which magnifies that noise where a gradient is near zero.
    assert all(rel_err(a.read(k), b.read(k)) < 1e-3 for k in ups)


def test_samples_carry_their_infotext(pipe, tmp_path):
    folder = write_images(tmp_path / "data", n=1)
    result = sdlite.train.lora(pipe, folder, output=tmp_path / "s.safetensors", prompt="p", resolution=64, steps=2,
                               sample_every=1, sample_prompts=["a red square"], sample_steps=2, seed=7)
    assert [p.name for p in result.samples] == ["step000001-0.png", "step000002-0.png"]
    params = sdlite.read_infotext(result.samples[1])
    assert (params["Prompt"], params["Steps"], params["Seed"]) == ("a red square", "2", "7")
    with Image.open(result.samples[0]) as image:
        assert image.size == (64, 64)


def test_loss_curve_png(tmp_path):
    rows = [LogRow(i + 1, 1.0 / (i + 1), 1e-4, float(i)) for i in range(50)]
    draw_loss_curve(tmp_path / "c.png", rows)
    with Image.open(tmp_path / "c.png") as image:
        pixels = image.convert("RGB")
        dark = sum(1 for x in range(0, 800, 4) for y in range(0, 450, 4) if pixels.getpixel((x, y)) == (20, 60, 160))
    assert dark > 10  # the moving-average line is drawn
