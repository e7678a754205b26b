"""exp_karras in ComfyUI: an entry in every scheduler dropdown and a standalone SIGMAS node."""

import comfy.samplers
import torch
from comfy_api.latest import io

from ..schedulers.sigmas import EXP_KARRAS_P_MAX, exp_karras_sigmas_from_table, sigmas_for_denoise

SCHEDULER_NAME = "exp_karras"
DEFAULT_P = 1.0


def exp_karras_scheduler(model_sampling, steps):
    """SCHEDULER_HANDLERS entry: exp-Karras at the default p on the model's own noise table."""
    return exp_karras_sigmas_from_table(steps, DEFAULT_P, table=model_sampling.sigmas).float()


def register():
    """Adds exp_karras to ComfyUI's scheduler table and name list, in place and only if absent.

    SCHEDULER_NAMES is the very list KSampler.SCHEDULERS (and so every dropdown) reads; rebinding it
    would hide the name from nodes that already hold the old list.
    """
    if SCHEDULER_NAME not in comfy.samplers.SCHEDULER_HANDLERS:
        comfy.samplers.SCHEDULER_HANDLERS[SCHEDULER_NAME] = comfy.samplers.SchedulerHandler(
            exp_karras_scheduler, use_ms=True)
    if SCHEDULER_NAME not in comfy.samplers.SCHEDULER_NAMES:
        comfy.samplers.SCHEDULER_NAMES.append(SCHEDULER_NAME)


class ExpKarrasSchedulerNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DirectDistillExpKarrasScheduler",
            display_name="ExpKarras Scheduler",
            category="sampling/custom_sampling/schedulers",
            description="Exponential-Karras sigmas (Li & Zhang 2025): training timesteps spaced uniformly in "
                        "exponential time, read from the model's own noise table. Feed SamplerCustom.",
            inputs=[
                io.Model.Input("model", tooltip="The model whose noise table the sigmas are read from."),
                io.Int.Input("steps", default=20, min=1, max=10000,
                             tooltip="Number of sampling steps (model evaluations for first-order samplers)."),
                io.Float.Input("p", default=DEFAULT_P, min=0.0, max=EXP_KARRAS_P_MAX, step=0.05,
                               tooltip="Curvature: 0 is uniform in timestep (like 'normal'); larger values take "
                                       "bigger steps at high noise and finer ones near the end. 1.0 is the "
                                       "default of the exp_karras dropdown entry."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the schedule to run, as in BasicScheduler: the last "
                                       "'steps' sigmas of a schedule of steps/denoise steps. 0 gives no sigmas."),
            ],
            outputs=[io.Sigmas.Output()],
        )

    @classmethod
    def execute(cls, model, steps, p, denoise) -> io.NodeOutput:
        return io.NodeOutput(exp_karras_node_sigmas(model.get_model_object("model_sampling"), steps, p, denoise))


def exp_karras_node_sigmas(model_sampling, steps: int, p: float, denoise: float) -> torch.Tensor:
    """What the ExpKarras Scheduler node outputs (also what the frontend plots for it)."""
    if denoise <= 0.0:
        return torch.zeros(0)
    table = model_sampling.sigmas
    return sigmas_for_denoise(lambda n: exp_karras_sigmas_from_table(n, p, table=table), steps, denoise).float()


NODES = [ExpKarrasSchedulerNode]
