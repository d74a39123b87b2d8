"""Our rewrite of the diffusion core of openai/improved-diffusion.

Provenance: the public API (module names, function and class names, their semantics and numerics)
follows ``openai/improved-diffusion@1bc7bbb`` (MIT, Copyright (c) 2021 OpenAI; the licence text is
in ``improved_diffusion/LICENSE`` and in the project ``LICENSE``), with fixes known from
``openai/guided-diffusion@22e0df8`` where stated. The code itself was written from the formulas in
Nichol & Dhariwal, "Improved Denoising Diffusion Probabilistic Models" (arXiv:2102.09672) and
Song et al., "Denoising Diffusion Implicit Models" (arXiv:2010.02502).

What we changed with respect to upstream:

* no MPI, no ``blobfile``, no ``logger``/``dist_util``/``train_util``/``fp16_util``/
  ``image_datasets`` (training lives in :mod:`medsegdiff.training`);
* schedule tables are torch tensors cached per device (float64 where the device supports it,
  cast to the sample dtype like upstream), so no numpy-to-device copy happens per step;
* ``_WrappedModel`` builds its timestep map once per device;
* ``space_timesteps("ddimN")`` raises an honest ``ValueError`` naming N and suggesting
  achievable counts; schedules work for tensors of any rank (2-D and 3-D images);
* ``progress=True`` shows a tqdm bar; sampling loops do no ``.item()``/``.cpu()`` host syncs;
* ``LossSecondMomentResampler`` uses plain ``int`` (no ``np.int``) and needs no process group;
* ``nn.checkpoint`` uses ``torch.utils.checkpoint`` (``use_reentrant=False``), ``update_ema``
  uses ``torch._foreach_lerp_``, ``normalization`` accepts a maximum group count;
* ``unet``: SDPA attention (same head layout), guided-diffusion's fixes for
  ``Downsample(use_conv=False)`` and the output-convolution width, optional depth resampling in
  3-D, options for time-free blocks, GroupNorm groups, ``num_head_channels``, channel-changing
  resampling and an encoder/decoder split with hooks (listed in its header), no fp16 helpers
  (use autocast), no ``SuperResModel``;
* DDIM with ``eta == 0`` draws no random numbers (identical samples, untouched RNG).

Modules: ``nn``, ``losses``, ``gaussian_diffusion``, ``respace``, ``resample``, ``script_util``,
``unet`` (each file repeats its provenance and changes in its header).
"""

from __future__ import annotations

__all__: list[str] = []
