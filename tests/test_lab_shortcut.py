"""The committed lab shortcut: a real file trained on the lab teacher, and 7+1 sampling with it."""

import pytest
import torch

from direct_distill.lab import CLASSIFIER_PATH, SHORTCUT_PATH, TEACHER_DIR
from direct_distill.lab.data import CLASS_NAMES
from direct_distill.lab.evaluator import Evaluator
from direct_distill.models import load_shortcut
from direct_distill.models.shortcut_file import trained_schedule
from direct_distill.pipelines import ShortcutCallback
from direct_distill.schedulers import ExpKarrasScheduler


def test_committed_shortcut_describes_itself():
    shortcut = load_shortcut(SHORTCUT_PATH)
    lo, hi = shortcut.t_band
    assert 240 < lo < 260 and 320 < hi < 340, "trained after steps 12-13 of 19 and 7 of 11 of beta runs"
    assert trained_schedule(shortcut) == ("beta", {})
    captured = {c["num_inference_steps"]: c["capture_steps"] for c in shortcut.metadata["extra"]["captured"]}
    assert captured == {19: [12, 13], 11: [7]}
    assert shortcut.latent_channels == 4 and shortcut.teacher == "lab/assets/teacher"
    psnr = shortcut.metadata["extra"]["heldout_psnr"]
    last = list(psnr)[-1]  # the last stage trained: "stage1", or "stage1+2"
    assert last.startswith("stage1") and psnr[last]["all"] > psnr["input"]["all"] + 10


def test_seven_plus_one_on_the_lab_teacher():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(TEACHER_DIR)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = ExpKarrasScheduler.from_config(pipe.scheduler.config)
    calls = []
    pipe.unet.register_forward_pre_hook(lambda *_: calls.append(1))
    prompts = [name for name in CLASS_NAMES for _ in range(6)]
    guidance = load_shortcut(SHORTCUT_PATH).metadata["extra"]["guidance_scale"]
    callback = ShortcutCallback(SHORTCUT_PATH, handoff_step=7)
    out = pipe(prompts, sigmas=callback.sigmas(11, pipe.scheduler), guidance_scale=guidance, output_type="np",
               callback_on_step_end=callback,
               generator=torch.Generator().manual_seed(0)).images
    assert len(calls) == 7
    images = torch.from_numpy(out).permute(0, 3, 1, 2) * 2 - 1
    accuracy = Evaluator(CLASSIFIER_PATH).accuracy(images, torch.arange(10).repeat_interleave(6))
    assert accuracy >= 0.7, f"7+1 class accuracy {accuracy:.2f} (chance is 0.10)"
    with pytest.raises(ValueError, match="band"):
        pipe(prompts[:2], num_inference_steps=20, callback_on_step_end=ShortcutCallback(SHORTCUT_PATH, 7))
