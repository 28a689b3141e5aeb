"""Bespoke solvers in other people's sampling loops.

- ``bespoke_ext.integrations.diffusers``: ``BespokeScheduler`` (a diffusers scheduler) and
  ``pipeline_velocity`` (a pipeline's transformer as a velocity field, for ``bespoke_ext.sample`` /
  ``bespoke_ext.train``). Needs ``diffusers`` (and ``transformers`` for the Flux / SD3 pipelines).
- ``bespoke_ext.integrations.kdiffusion``: ``sample_bespoke``, a k-diffusion-convention sampler
  function (the form ComfyUI's ``KSAMPLER`` takes) for flow models.

Nothing here is imported by ``import bespoke_ext``: diffusers stays an optional dependency.
"""
