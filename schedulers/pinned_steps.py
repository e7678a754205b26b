"""What the schedulers that pin a LoRA's own step counts share: an image-to-image run that sliced steps the
scheduler does not run is stopped with one clear error instead of sampling nothing."""

from __future__ import annotations


class ImageToImageGuard:
    """Mixin for a diffusers scheduler whose ``set_timesteps(n)`` may run another step count than the ``n`` asked
    (a pipeline's own default 50 read as "the LoRA's default", say 4).

    diffusers' image-to-image pipelines keep ``strength``'s share of the steps they *asked* for: from 50 asked at
    strength 0.5 they start at step 25, past the end of 4, and would return the noised input image without a single
    denoising step; at strength 0.95 they start at step 3 of the 4 run, one step where 3.8 were meant.
    ``set_begin_index`` (which they call with that start) therefore refuses any start but 0 when the steps asked
    are not the steps run; with ``num_inference_steps`` among the ones run, any start passes (SDXL's
    ``denoising_start`` included). Subclasses call :meth:`_record_steps` in ``set_timesteps`` and name their step
    counts in :meth:`_steps_hint`.
    """

    _asked_steps: int | None = None

    def _record_steps(self, asked: int | None) -> None:
        self._asked_steps = asked

    def _steps_hint(self) -> str:
        raise NotImplementedError

    def set_begin_index(self, begin_index: int = 0):
        run = len(self.timesteps) if getattr(self, "timesteps", None) is not None else None
        if run is not None and begin_index > 0 and self._asked_steps not in (None, run):
            left = "nothing would be denoised" if begin_index >= run else \
                f"{run - begin_index} of them would run, not the share of {run} the strength asks"
            raise ValueError(
                f"an image-to-image run (strength or denoising_start) sliced off the first {begin_index} of "
                f"{self._asked_steps} steps, but this scheduler samples {run}: {left}. Pass num_inference_steps (one "
                f"of {self._steps_hint()}) with strength or denoising_start; the run then keeps its share of them")
        parent = getattr(super(), "set_begin_index", None)
        if parent is not None:
            return parent(begin_index)
        self._begin_index = begin_index  # DDIM has no begin index of its own: its step needs none
