"""Training data: kohya's folder convention and bucket rules, captions, checks that name the bad file, the latent
cache, batches, and SDXL's size conditioning against diffusers' add_time_ids embedding."""

from __future__ import annotations

import random

import pytest
import torch
from diffusers.models.embeddings import Timesteps
from PIL import Image

from sdlite.train.batches import Augment, Batches, LatentCache, epoch_order
from sdlite.train.data import bucket_sizes, place
from sdlite.train.batches import adm_vector
from sdlite.train.data import DataError, ImageFolder, vary_caption
from sdlite.vae import AutoencoderKL

from conftest import randomize_, rel_err
from sdfiles import VAE


def image(path, size=(64, 64), seed=0):
    g = torch.Generator().manual_seed(seed)
    data = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
    Image.fromarray(data).save(path)
    return path


def test_buckets_follow_kohyas_rule():
    # kohya sd-scripts' bucket list for 512x512 training, min 256, max 1024, steps of 64.
    tall = [(256, 1024), (256, 960), (256, 896), (256, 832), (320, 768), (320, 704), (384, 640), (448, 576)]
    assert bucket_sizes(512) == tall + [(512, 512)] + [(h, w) for w, h in reversed(tall)]
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 1024 * 1024 for w, h in bucket_sizes(1024))


def test_placement_covers_the_bucket_and_centres_the_cut():
    p = place((1000, 500), bucket_sizes(512))
    assert p.bucket == (704, 320)  # aspect 2.2 is nearest 2.0
    assert p.scaled == (704, 352) and p.crop == (0, 16)  # relatively wider bucket: scaled to its width
    p = place((500, 1100), bucket_sizes(512))  # exactly the ratio of 320x704: no cut
    assert p.bucket == (320, 704) and p.scaled == (320, 704) and p.crop == (0, 0)
    r = place((1000, 500), bucket_sizes(512), random.Random(0))
    assert r.crop[0] == 0 and 0 <= r.crop[1] <= 32


def test_folders_repeats_and_captions(tmp_path):
    concept = tmp_path / "3_sks dog"
    concept.mkdir()
    image(concept / "a.png")
    image(concept / "b.jpg")
    (concept / "b.txt").write_text("a photo of sks dog, sitting, grass\n")
    other = tmp_path / "1_style"
    other.mkdir()
    image(other / "c.png", (128, 64))
    data = ImageFolder(tmp_path, resolution=64, min_bucket=64, max_bucket=128)
    captions = {e.path.name: (e.caption, e.repeats) for e in data.examples}
    assert captions == {"a.png": ("sks dog", 3), "b.jpg": ("a photo of sks dog, sitting, grass", 3),
                        "c.png": ("style", 1)}
    assert data.num_images == 7
    assert data.tag_frequency()["3_sks dog"]["sitting"] == 1
    # --prompt wins over the folder name, a caption file over both
    data = ImageFolder(tmp_path, resolution=64, prompt="x", min_bucket=64, max_bucket=128)
    assert sorted(e.caption for e in data.examples) == ["a photo of sks dog, sitting, grass", "x", "x"]
    order = epoch_order(data, 2, seed=1, epoch=0)
    assert sorted(data.examples[i].path.name for b in order for i in b) == ["a.png"] * 3 + ["b.jpg"] * 3 + ["c.png"]
    assert all(len({data.examples[i].placement.bucket for i in b}) == 1 for b in order)


def test_bad_data_names_the_file(tmp_path):
    image(tmp_path / "ok.png")
    image(tmp_path / "small.png", (16, 16))
    with pytest.raises(DataError, match="small.png: 16x16 is too small"):
        ImageFolder(tmp_path, resolution=64, prompt="p")
    (tmp_path / "small.png").unlink()
    with pytest.raises(DataError, match=r"ok.png: no caption \(ok.txt is missing\)"):
        ImageFolder(tmp_path, resolution=64)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="broken.png: cannot read the image"):
        ImageFolder(tmp_path, resolution=64, prompt="p")
    with pytest.raises(DataError, match="no such folder"):
        ImageFolder(tmp_path / "missing", prompt="p")


def test_caption_variation():
    rng = random.Random(0)
    caption = "sks, dog, red collar, grass, sunny"
    shuffled = {vary_caption(caption, rng, shuffle_tags=True, keep_tokens=2) for _ in range(30)}
    assert len(shuffled) > 3 and all(s.startswith("sks, dog, ") for s in shuffled)
    assert all(sorted(s.split(", ")) == sorted(caption.split(", ")) for s in shuffled)
    dropped = [vary_caption(caption, rng, dropout=0.5) for _ in range(200)]
    assert 60 < dropped.count("") < 140 and set(dropped) == {"", caption}


@pytest.fixture(scope="module")
def vae():
    return randomize_(AutoencoderKL(VAE), 4).eval()


def test_latent_cache_in_memory_and_on_disk(tmp_path, vae):
    for i in range(2):
        image(tmp_path / f"{i}.png", (64, 64), seed=i)
    data = ImageFolder(tmp_path, resolution=64, prompt="p")
    memory = LatentCache(data, vae, flip=True, seed=3)
    disk = LatentCache(data, vae, flip=True, folder=tmp_path / "cache", seed=3)
    files = sorted((tmp_path / "cache").iterdir())
    assert len(files) == 2
    again = LatentCache(data, None, flip=True, folder=tmp_path / "cache", seed=3)  # no VAE needed: read back
    for i in range(2):
        for f in (False, True):
            assert torch.equal(memory.get(i, f), disk.get(i, f)) and torch.equal(disk.get(i, f), again.get(i, f))
    with torch.no_grad():
        flipped = vae.encode(data.pixels(0, flip=True)[None]).mean * vae.scale_factor
        mean = vae.encode(data.pixels(0)[None]).mean * vae.scale_factor
    # the cached latents are posterior samples: near the mean, the mirrored one near the mirror image's mean
    assert rel_err(memory.get(0, True), flipped[0]) < rel_err(memory.get(0, True), mean[0])
    batches = Batches(data, memory, 2, seed=0, augment=Augment(flip=True, caption_dropout=0.5))
    batch = batches[5]
    assert batch.latents.shape == (2, 4, 8, 8) and batch.target_size == (64, 64)
    assert torch.equal(batches[5].latents, batch.latents) and batches[5].captions == batch.captions


def test_sdxl_size_conditioning_matches_diffusers_time_ids():
    class Pipe:
        family = "sdxl"

    pooled = torch.randn(2, 128)
    y = adm_vector(Pipe(), pooled, [(500, 1000), (64, 64)], [(0, 64), (3, 0)], (384, 640))
    # diffusers' SDXL: add_time_ids = original_size + crops_coords_top_left + target_size, each number embedded by
    # its UNet's add_time_proj (Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)).
    time_ids = torch.tensor([[500, 1000, 0, 64, 384, 640], [64, 64, 3, 0, 384, 640]], dtype=torch.float32)
    expected = Timesteps(256, True, 0)(time_ids.flatten()).reshape(2, -1)
    assert torch.equal(y[:, :128], pooled)
    assert rel_err(y[:, 128:], expected) < 1e-6


def test_bad_options_are_refused_before_the_model_is_read(tmp_path):
    import sdlite.train

    missing = tmp_path / "no-such-model.safetensors"  # never opened: the options are checked first
    with pytest.raises(TypeError, match="unknown training option.*refine_steps"):
        sdlite.train.lora(missing, tmp_path, output=tmp_path / "o.safetensors", refine_steps=3)
    with pytest.raises(ValueError, match="refine_latents.*got -1"):
        sdlite.train.lora(missing, tmp_path, output=tmp_path / "o.safetensors", refine_latents=-1)
