"""The generation chain's links on fake models: the step object, CFG over AND parts, the refiner handoff, UNetCall's
hooks. The expected values are A1111's documented counting rules (CFGDenoiser.step counts model calls; prompt
schedules are laid over sampler.total_steps; the refiner switches after switch_at of the budgeted calls), and the
callback-driven step count sdlite's ControlNet gating used before the step object existed."""

from __future__ import annotations

import pytest
import torch

import sdlite.schedulers as S
from sdlite.guidance import Cond, GuidedDenoiser, Handoff, StepState, pad_parts
from sdlite.unet_call import UNetCall


class Recorder:
    """A denoiser D(x; σ) = x·c that records what each call was given and what the step object said."""

    def __init__(self, step: StepState, c: float = 0.5):
        self.step, self.c, self.seen = step, c, []

    def __call__(self, x, sigma, context=None, y=None, cond_rows=None):
        self.seen.append(dict(call=self.step.call, step=self.step.step, sigma=float(sigma[0]), context=context,
                              rows=cond_rows))
        return x * self.c


def constant(conds, uncond):
    return lambda call: (conds, uncond)


def cond(value: float, length: int = 77) -> Cond:
    return Cond(torch.full((1, length, 4), value))


@pytest.mark.parametrize("name", ["Euler", "Euler a", "Heun", "DPM2", "DPM++ SDE", "LMS", "DPM++ 2M", "Restart",
                                  "DDIM", "PLMS", "UniPC", "LCM"])
@pytest.mark.parametrize("run_steps", [7, 4])
def test_step_object_counts_calls_and_steps_without_the_callback(name, run_steps):
    """The sampler step of every call, read off σ, is the number of steps the sampler had reported through its
    callback when the call was made (the old source of ControlNet's progress), yet no callback is passed. Not in the
    list: DPM2 a and DPM++ 2S a, whose midpoint call can lie below the next grid σ (the ancestral step lands below
    it), and DPM fast/adaptive, which run their own steps; for them the σ rule gives the position in the schedule."""
    sp = S.get_sampler_and_sigmas(name, "Automatic", 7, run_steps, seeds=[1])
    x = torch.randn(1, 4, 8, 8) * sp.sigmas[0]
    reported = []

    def reference_model(x, sigma, **_):
        reported.append(len(done))
        return x * 0.5

    done: list[int] = []
    sp(reference_model, x, callback=lambda info: done.append(info["i"]))
    step = StepState(sp.grid, sp.steps, sp.model_calls)
    fake = Recorder(step)
    model = GuidedDenoiser(fake, constant([(cond(1.0), 1.0)], cond(0.0)), 1.0, step)
    sp(model, x)
    assert [s["step"] for s in fake.seen] == reported
    assert [s["call"] for s in fake.seen] == list(range(len(reported)))
    assert step.progress == reported[-1] / run_steps


def test_step_before_any_call_and_in_low_precision():
    step = StepState(torch.tensor([3.0, 2.0, 1.0, 0.0]), 3, 3)
    assert step.step == 0 and step.call == -1
    step.advance(torch.tensor([2.0, 2.0], dtype=torch.float16))
    assert (step.call, step.step, step.progress) == (0, 1, 1 / 3)


def test_cfg_over_and_parts_and_prompt_schedule_counts_calls():
    """denoised = u + Σ wᵢ·cfg·(cᵢ − u) (composable diffusion); the schedule is asked for model call 0, 1, 2, …"""
    step = StepState(torch.tensor([2.0, 1.0, 0.0]), 2, 4)
    asked = []

    def cond_at(call):
        asked.append(call)
        return [(cond(1.0), 1.0), (cond(2.0), 0.5)], cond(0.0)

    def denoiser(x, sigma, context, y=None, cond_rows=None):
        return x + context[:, :1, :1, None]  # each row shifted by its context value

    model = GuidedDenoiser(denoiser, cond_at, 3.0, step)
    x = torch.randn(1, 1, 2, 2)
    for sigma in (2.0, 1.5, 1.0, 0.5):
        out = model(x, torch.tensor([sigma]))
    assert asked == [0, 1, 2, 3]
    assert torch.allclose(out, x + 0.0 + 3.0 * (1.0 * 1.0 + 0.5 * 2.0))


def test_cond_rows_mark_the_positive_prompts_and_lengths_split_the_batch():
    step = StepState(torch.tensor([1.0, 0.0]), 1, 1)
    fake = Recorder(step)
    model = GuidedDenoiser(fake, constant([(cond(1.0), 1.0)], cond(0.0, length=154)), 7.0, step)
    model(torch.randn(2, 4, 8, 8), torch.tensor([1.0, 1.0]))
    assert [s["rows"].tolist() for s in fake.seen] == [[True, True], [False, False]]
    fake.seen.clear()
    model = GuidedDenoiser(fake, constant([(cond(1.0), 1.0)], cond(0.0)), 7.0, step)
    model(torch.randn(2, 4, 8, 8), torch.tensor([1.0, 1.0]))
    assert [s["rows"].tolist() for s in fake.seen] == [[True, True, False, False]]
    padded = pad_parts([(cond(1.0), 1.0), (Cond(torch.arange(154.0).view(1, 154, 1)), 0.5)])
    assert padded[0][0].context.shape[1] == 154 and torch.all(padded[0][0].context[:, 77:] == 1.0)


def test_handoff_switches_after_its_share_of_the_calls_and_shares_the_count():
    """Euler, 4 steps, switch at 0.5: calls 0-2 have done 0, 1/4, 2/4 (not past 0.5): base; call 3: refiner. The
    refiner's prompt schedule continues at call 3."""
    sp = S.get_sampler_and_sigmas("Euler", steps=4)
    step = StepState(sp.grid, sp.steps, sp.model_calls)
    base, refiner = Recorder(step, 0.5), Recorder(step, 0.25)
    asked = []
    schedule = lambda call: asked.append(call) or ([(cond(1.0), 1.0)], cond(0.0))  # noqa: E731
    switched = []
    model = Handoff(GuidedDenoiser(base, schedule, 1.0, step), GuidedDenoiser(refiner, schedule, 1.0, step), 0.5,
                    on_switch=lambda: switched.append(step.call))
    sp(model, torch.randn(1, 4, 8, 8) * sp.sigmas[0])
    assert [s["call"] for s in base.seen] == [0, 1, 2] and [s["call"] for s in refiner.seen] == [3]
    assert asked == [0, 1, 2, 3] and switched == [3]
    with pytest.raises(ValueError, match="step object"):
        Handoff(GuidedDenoiser(base, schedule, 1.0, step),
                GuidedDenoiser(refiner, schedule, 1.0, StepState(sp.grid, 4, 4)), 0.5)


class FakeUNet(torch.nn.Module):
    """The current UNetModel's keywords, without ``patches``: a call passing it would fail."""

    def forward(self, x, t, context, y=None, control=None):
        self.got = dict(x=x, control=control)
        return x[:, :4]


class PatchedUNet(FakeUNet):
    def forward(self, x, t, context, y=None, control=None, patches=None):
        self.patches = patches
        return super().forward(x, t, context, y=y, control=control)


def test_unet_call_hooks_get_the_rows_and_the_step():
    step = StepState(torch.tensor([2.0, 1.0, 0.0]), 2, 2)
    step.advance(torch.tensor([1.0, 1.0]))
    seen = {}

    def control(x, t, context, y, cond_rows, s):
        seen["control"] = (cond_rows.tolist(), s.step)
        return [torch.ones(1)]

    def patches(cond_rows, s):
        seen["patches"] = (cond_rows.tolist(), s.progress)
        return None if s.step == 1 else {"step": s.step}

    image_cond = torch.full((1, 5, 8, 8), 3.0)
    x, rows = torch.randn(2, 4, 8, 8), torch.tensor([True, False])
    unet = FakeUNet()
    call = UNetCall(unet, step, image_cond=image_cond, control=control, patches=patches)
    call(x, torch.zeros(2), torch.zeros(2, 77, 4), cond_rows=rows)  # the hook says None: no keyword for the UNet
    assert seen == {"control": ([True, False], 1), "patches": ([True, False], 0.5)}
    assert unet.got["control"][0].shape == (1,) and torch.equal(unet.got["x"][:, 4:], image_cond.repeat(2, 1, 1, 1))
    step.advance(torch.tensor([0.5, 0.5]))
    unet = PatchedUNet()
    UNetCall(unet, step, patches=patches)(x, torch.zeros(2), torch.zeros(2, 77, 4), cond_rows=rows)
    assert unet.patches == {"step": 2}
    UNetCall(FakeUNet())(x, torch.zeros(2), torch.zeros(2, 77, 4))  # no hooks, no step needed
    with pytest.raises(ValueError, match="StepState"):
        UNetCall(FakeUNet(), control=control)
