"""The NAFNet shortcut in ComfyUI: a loader, a KSampler that hands off after K steps, and a SAMPLER for
SamplerCustomAdvanced. The hand-off maths is models/handoff.py; here is only the wiring, and the shortcut's
place in ComfyUI's model management (loaded, moved and offloaded like the teacher, in the teacher's dtype)."""

import copy
import logging
import os

import comfy.model_management
import comfy.model_patcher
import comfy.model_sampling
import comfy.sample
import comfy.samplers
import comfy.utils
import folder_paths
import latent_preview
import torch
from comfy_api.latest import io

from ..models.handoff import (check_handoff_at_sigma, check_handoff_step, check_teacher, fitting_steps_hint,
                              handoff_steps_in_band, shortcut_from_ve)
from ..models.nafnet import TwoStageShortcut
from ..models.shortcut_file import load_shortcut, trained_schedule
from .model_identity import check_checkpoint_noise_table, predicts, sampling_kind, unet_shape_fingerprint
from .schedulers import DEFAULT_P

FOLDER_NAME = "direct_distill_shortcuts"  # models/shortcuts/
ADDITIONAL_MODELS_KEY = "direct_distill_shortcut"
Shortcut = io.Custom("DD_SHORTCUT")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class ComfyShortcut:
    """What Load Shortcut outputs: the shortcut as read from its file (on the CPU, in the file's dtype), handed to
    ComfyUI's model management as one ModelPatcher per (device, dtype) of the teachers it runs with (usually one).
    """

    def __init__(self, shortcut: TwoStageShortcut):
        self.shortcut = shortcut
        self._patchers: dict[tuple[torch.device, torch.dtype], comfy.model_patcher.ModelPatcher] = {}

    def patcher(self, device, dtype: torch.dtype) -> comfy.model_patcher.ModelPatcher:
        key = (_indexed(torch.device(device)), dtype)
        if key not in self._patchers:
            shared = any(p.model is self.shortcut for p in self._patchers.values())
            model = self.shortcut
            if shared or dtype != next(self.shortcut.parameters()).dtype:
                model = copy.deepcopy(self.shortcut).to(dtype)
            self._patchers[key] = comfy.model_patcher.ModelPatcher(
                model, load_device=key[0], offload_device=comfy.model_management.unet_offload_device())
        return self._patchers[key]


def _indexed(device: torch.device) -> torch.device:
    """``device`` with its index, as a tensor on it reports it: the model's load device may be ``mps`` where the
    latent is on ``mps:0``, one device under two names."""
    if device.type == "cpu" or device.index is not None:
        return device
    return torch.empty(0, device=device).device


def compute_dtype(base_model) -> torch.dtype:
    """The dtype a teacher's UNet computes in (BaseModel._apply_model's rule); float32 for any other kind."""
    dtype = base_model.manual_cast_dtype or base_model.get_dtype()
    return dtype if dtype in _DTYPES else torch.float32


def register():
    """Adds ComfyUI/models/shortcuts to folder_paths (once; paths a user added in extra_model_paths stay) and
    creates it, so that Load Shortcut shows where its files go."""
    default = os.path.join(folder_paths.models_dir, "shortcuts")
    folder_paths.add_model_folder_path(FOLDER_NAME, default)
    try:
        os.makedirs(default, exist_ok=True)
    except OSError as err:  # a read-only install: the folder list still works with the user's own paths
        logging.warning("Direct Distill: cannot create %s (%s)", default, err)
    extensions = folder_paths.folder_names_and_paths[FOLDER_NAME][1]
    if ".safetensors" in extensions:
        return
    if isinstance(extensions, set):
        extensions.add(".safetensors")
    else:
        extensions.append(".safetensors")


def shortcut_sampler(base, shortcut: ComfyShortcut, handoff_step: int,
                     force: bool = False) -> comfy.samplers.KSAMPLER:
    """A KSAMPLER that runs ``base`` over the first ``handoff_step`` steps of its sigmas, then the shortcut.

    Inside a KSAMPLER function x is the k-diffusion latent (VE, ``x0 + sigma eps``) after the latent
    format's process_in, i.e. VAE latent times scaling factor, exactly what diffusers' latents hold
    before VP scaling; the shortcut's x0 is returned for the remaining steps (the sampler's
    inverse_noise_scaling and process_out then apply as usual). The shortcut is loaded through
    comfy.model_management onto x's device, in the teacher's compute dtype.
    """
    if not isinstance(base, comfy.samplers.KSAMPLER):
        raise TypeError(f"Shortcut Sampler wraps a k-diffusion sampler (KSAMPLER, e.g. from KSamplerSelect); "
                        f"got {type(base).__name__}")

    def sample_with_shortcut(model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
        steps = len(sigmas) - 1
        check_handoff_step(handoff_step, steps)
        if float(sigmas[-1]) > 0:  # a sampler returns the latent at its last sigma; the shortcut's is clean
            raise ValueError(f"the shortcut finishes a run: its sigmas must end at 0, these end at "
                             f"{float(sigmas[-1]):.4g} (the high part of a SplitSigmas?); give it the whole run's "
                             "sigmas, or sample this part with another sampler")
        guider = model.inner_model  # KSamplerX0Inpaint -> guider -> BaseModel
        teacher = guider.inner_model
        model_sampling = teacher.model_sampling
        if not (isinstance(model_sampling, comfy.model_sampling.ModelSamplingDiscrete)
                and isinstance(model_sampling, comfy.model_sampling.EPS)):
            raise ValueError(f"the shortcut needs a discrete VP model (SD1.x/2.x/XL-style noise schedule); this "
                             f"model samples with {sampling_kind(model_sampling)}")
        check_checkpoint_noise_table(model_sampling, "the shortcut")  # its band is in the checkpoint's timesteps
        # Before any step, so a wrong model or a hand-off outside the trained band costs nothing.
        check_teacher(shortcut.shortcut, unet_shape_fingerprint(guider.model_patcher), "the MODEL sampled here",
                      predicts(model_sampling))
        try:
            check_handoff_at_sigma(shortcut.shortcut, sigmas[handoff_step], model_sampling.sigmas, force)
        except ValueError as err:
            fits = handoff_steps_in_band(shortcut.shortcut.t_band, sigmas, model_sampling.sigmas)
            raise ValueError(f"{err} ({fitting_steps_hint(fits, steps)})") from None
        x = base.sampler_function(model, x, sigmas[:handoff_step + 1], extra_args=extra_args, callback=callback,
                                  disable=disable, **options)
        patcher = shortcut.patcher(x.device, compute_dtype(teacher))
        # Fully: its layers are plain torch ones, which cannot run partly offloaded (a no-op once loaded).
        comfy.model_management.load_models_gpu([patcher], force_full_load=True)
        x0 = _inpainting(model, x, sigmas[handoff_step], extra_args or {}, lambda x: shortcut_from_ve(
            patcher.model, x, sigmas[handoff_step], model_sampling.sigmas, force=force))
        if callback is not None:  # the shortcut stands for all remaining steps: finish the progress bar on x0
            callback({"x": x0, "i": steps - 1, "sigma": sigmas[-2], "sigma_hat": sigmas[-2], "denoised": x0})
        return x0

    return comfy.samplers.KSAMPLER(sample_with_shortcut, extra_options=base.extra_options,
                                   inpaint_options=base.inpaint_options)


def _inpainting(model, x, sigma, extra_args: dict, denoise):
    """``denoise(x)`` as one model call of ComfyUI's inpainting wrapper (KSamplerX0Inpaint) makes it: with a noise
    mask, the kept area enters noised to ``sigma`` from the latent image and leaves as the latent image itself."""
    mask = extra_args.get("denoise_mask")
    if mask is None:
        return denoise(x)
    sigma = sigma.reshape(1).expand(x.shape[0]).to(x)
    mask_function = (extra_args.get("model_options") or {}).get("denoise_mask_function")
    if mask_function is not None:  # e.g. Differential Diffusion's per-sigma mask
        mask = mask_function(sigma, mask, extra_options={"model": model.inner_model, "sigmas": model.sigmas})
    kept = 1.0 - mask
    noised = model.inner_model.inner_model.scale_latent_inpaint(x=x, sigma=sigma, noise=model.noise,
                                                                 latent_image=model.latent_image)
    return denoise(x * mask + noised * kept) * mask + model.latent_image * kept


def _handoff_inputs():
    return [
        io.Int.Input("handoff_step", default=7, min=1, max=10000,
                     tooltip="K: steps run with the model before the shortcut jumps to the final latent; less than "
                             "the steps run. 7 of 12 exp_karras steps (7+1) hands off at t=255, the noise level of "
                             "step 12 of the 20-step runs a shortcut is trained on by default."),
        io.Boolean.Input("force", default=False,
                         tooltip="Hand off even where the timestep lies outside the band the shortcut was trained "
                                 "for (its output there is unreliable)."),
    ]


class LoadShortcut(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DirectDistillLoadShortcut",
            display_name="Load Shortcut (NAFNet)",
            category="loaders",
            description="Loads a Direct Distill shortcut (two-stage TimeEmbedNAFNet, one .safetensors file from "
                        "models/shortcuts) that replaces a teacher's last sampling steps.",
            inputs=[
                io.Combo.Input("shortcut_name", options=folder_paths.get_filename_list(FOLDER_NAME),
                               tooltip="The shortcut file, from ComfyUI/models/shortcuts."),
            ],
            outputs=[Shortcut.Output(tooltip="The shortcut, with the teacher and timestep band it was trained for.")],
        )

    @classmethod
    def execute(cls, shortcut_name) -> io.NodeOutput:
        # A malformed or foreign file raises FileFormatError naming the file.
        return io.NodeOutput(ComfyShortcut(load_shortcut(folder_paths.get_full_path_or_raise(FOLDER_NAME,
                                                                                             shortcut_name))))


# The nodes that give a schedule as SIGMAS, for those the KSampler's scheduler list lacks (or has at other settings).
_SIGMAS_NODES = {"align_your_steps": "AlignYourStepsScheduler", "gits": "GITSScheduler",
                 "polyexponential": "PolyexponentialScheduler", "exp_karras": "ExpKarras Scheduler"}


def warn_other_schedule(shortcut: TwoStageShortcut, scheduler: str) -> None:
    """One warning when the runs handed to ``shortcut`` are not of the schedule it learnt to finish: inside its band
    it runs, but on latents unlike those it was trained on. A schedule the list lacks, or has at other settings
    (exp_karras at p other than the entry's 1), is pointed to its sigmas node and the Shortcut Sampler."""
    trained, params = trained_schedule(shortcut)
    # the list's entry of that name gives exactly that schedule at its defaults (exp_karras: p = DEFAULT_P)
    listed = (trained in comfy.samplers.KSampler.SCHEDULERS
              and params == ({"p": DEFAULT_P} if trained == "exp_karras" else {}))
    if listed and scheduler == trained:
        return
    settings = "" if listed else ", ".join(f"{k}={v}" for k, v in params.items())
    learnt = f"{trained} ({settings})" if settings else trained
    if listed:
        advice = f"Pick the {trained} scheduler."
    else:
        node = _SIGMAS_NODES.get(trained, f"{trained} sigmas")
        advice = (f"The scheduler list has no {learnt}: make its sigmas with the {node} node"
                  + (f" at {settings}" if settings else "") + " and sample with the Shortcut Sampler in "
                  "SamplerCustomAdvanced.")
    logging.warning("Direct Distill: this shortcut learnt to finish %s runs; the %s scheduler hands it latents it "
                    "was not trained on, where its jump is less accurate. %s", learnt, scheduler, advice)


class ShortcutKSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DirectDistillShortcutKSampler",
            display_name="Shortcut KSampler",
            category="sampling",
            description="KSampler that runs the first handoff_step steps with the model, then lets the NAFNet "
                        "shortcut jump straight to the final latent (Li & Zhang 2025: 7+1 steps).",
            inputs=[
                io.Model.Input("model", tooltip="The teacher model the shortcut was distilled from."),
                Shortcut.Input("shortcut", tooltip="From Load Shortcut (NAFNet)."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                             tooltip="The random seed used for creating the noise."),
                io.Int.Input("steps", default=12, min=1, max=10000,
                             tooltip="Steps of the full schedule; the shortcut replaces those after handoff_step."),
                *_handoff_inputs(),
                io.Float.Input("cfg", default=7.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale of the model steps."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="dpmpp_2m",
                               tooltip="The sampler of the model steps (the paper: DPM++ 2M)."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="exp_karras",
                               tooltip="The schedule: the one the shortcut was trained on (exp_karras unless made with "
                                       "distill shortcut --schedule; its file records it)."),
                io.Conditioning.Input("positive", tooltip="What to include in the image."),
                io.Conditioning.Input("negative", tooltip="What to exclude from the image."),
                io.Latent.Input("latent_image", tooltip="The latent image to denoise."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="As in KSampler: the last 'steps' sigmas of a longer schedule."),
            ],
            outputs=[io.Latent.Output(tooltip="The shortcut's final latent.")],
        )

    @classmethod
    def execute(cls, model, shortcut, seed, steps, handoff_step, force, cfg, sampler_name, scheduler, positive,
                negative, latent_image, denoise) -> io.NodeOutput:
        # The sigmas the stock KSampler would run (denoise, and the samplers that drop the penultimate sigma).
        sigmas = comfy.samplers.KSampler(model, steps, model.load_device, sampler_name, scheduler, denoise).sigmas
        if len(sigmas) == 0:  # denoise 0: no step to run, the latent is returned as it came (as KSampler does)
            return io.NodeOutput(latent_image)
        check_handoff_step(handoff_step, len(sigmas) - 1)  # before the teacher and the shortcut load
        warn_other_schedule(shortcut.shortcut, scheduler)
        latent = latent_image.copy()
        latent["samples"] = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
        noise = comfy.sample.prepare_noise(latent["samples"], seed, latent.get("batch_index"))
        sampler = shortcut_sampler(comfy.samplers.sampler_object(sampler_name), shortcut, handoff_step, force)
        # Loaded with the teacher before the first step, its memory counted with the teacher's.
        model = model.clone()
        model.set_additional_models(ADDITIONAL_MODELS_KEY,
                                    [shortcut.patcher(model.load_device, compute_dtype(model.model))])
        latent["samples"] = comfy.sample.sample_custom(
            model, noise, cfg, sampler, sigmas, positive, negative, latent["samples"],
            noise_mask=latent.get("noise_mask"), callback=latent_preview.prepare_callback(model, len(sigmas) - 1),
            disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
        return io.NodeOutput(latent)


class ShortcutSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DirectDistillShortcutSampler",
            display_name="Shortcut Sampler",
            category="sampling/custom_sampling/samplers",
            description="Wraps a SAMPLER: it runs the first handoff_step steps of the given sigmas, then the NAFNet "
                        "shortcut jumps to the final latent. Use with SamplerCustomAdvanced.",
            inputs=[
                io.Sampler.Input("sampler", tooltip="The sampler of the model steps, e.g. KSamplerSelect dpmpp_2m."),
                Shortcut.Input("shortcut", tooltip="From Load Shortcut (NAFNet)."),
                *_handoff_inputs(),
            ],
            outputs=[io.Sampler.Output()],
        )

    @classmethod
    def execute(cls, sampler, shortcut, handoff_step, force) -> io.NodeOutput:
        return io.NodeOutput(shortcut_sampler(sampler, shortcut, handoff_step, force))


NODES = [LoadShortcut, ShortcutKSampler, ShortcutSampler]
