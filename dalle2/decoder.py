"""The decoder: a cascade of U-Nets from a CLIP image embedding to pixels, each stage trained on its own.

Stage 1 generates at `image_sizes[0]` from the embedding; every later stage upsamples the previous
stage's output, which it sees blurred and noised during training (noise conditioning augmentation,
Ho et al. 2021) so that it tolerates the imperfect images of the stage before at sampling time.
Images are [0, 1] at the API and [-1, 1] inside the diffusion.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .configs import DecoderConfig, UnetConfig, with_diffusion_kwargs
from .diffusion import GaussianDiffusion, classifier_free_guidance, dynamic_threshold, tile
from .reference_sampling import reference_ddim
from .row_random import RowRandom
from .unet import Unet

Text = Union[Sequence[str], Tensor, None]


def build_unet(config: UnetConfig) -> nn.Module:
    """The unet of `config.arch`: compact (unet.py) or reference (DALLE2-pytorch's, reference_unet.py)."""
    if config.arch == "reference":
        from .reference_unet import ReferenceUnet

        return ReferenceUnet(config)
    return Unet(config)


def blur_kernel(sigma: float) -> int:
    """An odd Gaussian kernel size covering +-3 sigma."""
    return 2 * max(1, int(3 * sigma + 0.5)) + 1


def resize_image(images: Tensor, size: int) -> Tensor:
    """Resize [B, C, H, W] images to size x size (antialiased when shrinking)."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def random_crops(images: list[Tensor], size: int, rng: RowRandom) -> list[Tensor]:
    """A size x size window of each sample, at a random place per sample, the same place in every tensor of
    `images` (each [B, C, H, W], all of one height and width)."""
    _, _, height, width = images[0].shape
    tops, lefts = rng.randint(height - size + 1).tolist(), rng.randint(width - size + 1).tolist()
    return [torch.stack([x[i, :, top:top + size, left:left + size] for i, (top, left) in enumerate(zip(tops, lefts))])
            for x in images]


class Decoder(nn.Module):
    """Cascade of Unets; `decoder(images, image_embed=..., unet_number=k)` is the loss of stage k."""

    def __init__(
        self,
        unet: Union[nn.Module, Sequence[nn.Module], None] = None,
        clip: Optional[nn.Module] = None,
        config: Optional[DecoderConfig] = None,
        **kwargs,
    ):
        super().__init__()
        unets = [unet] if isinstance(unet, nn.Module) else list(unet or [])
        if config is None:
            fields = with_diffusion_kwargs(DecoderConfig, kwargs)
            if unets:  # a given unet is used as it is: its output width (learned variance or not) is built in
                fields["unets"] = [u.config.model_copy(update={"learned_variance": u.config.learned_variance})
                                   for u in unets]
            config = DecoderConfig(**fields)
        elif kwargs:
            raise ValueError(f"pass either config or keyword settings, not both (got {sorted(kwargs)})")
        self.config = config
        for i, (given, wanted) in enumerate(zip(unets, config.unets)):
            given_fields, wanted_fields = given.config.model_dump(), wanted.model_dump()
            differences = [f"{name}: the unet has {value!r}, the config {wanted_fields[name]!r}"
                           for name, value in given_fields.items() if value != wanted_fields[name]]
            if differences:  # never swapped for a fresh one: that would throw the given weights away
                raise ValueError(f"the unet given as unets[{i}] does not match the config: {'; '.join(differences)}")
        if unets and len(unets) != len(config.unets):
            raise ValueError(f"{len(unets)} unets given for a config of {len(config.unets)}")
        self.unets = nn.ModuleList(unets or [build_unet(c) for c in config.unets])
        self.diffusions = nn.ModuleList(
            GaussianDiffusion(d.timesteps, d.beta_schedule, config.predict, d.p2_loss_weight_gamma, d.p2_loss_weight_k,
                              learned_variance=config.unets[i].learned_variance, vb_loss_weight=config.vb_loss_weight)
            for i, d in enumerate(config.diffusion_for(i) for i in range(len(self.unets)))
        )
        self.clip = clip
        if clip is not None:
            clip.requires_grad_(False)
            for i, u in enumerate(config.unets):
                if not config.unconditional and u.image_embed_dim != clip.embed_dim:
                    raise ValueError(f"unets[{i}].image_embed_dim={u.image_embed_dim} but CLIP embeds to {clip.embed_dim}")

    @property
    def image_sizes(self) -> tuple[int, ...]:
        return self.config.image_sizes

    def _unet(self, unet_number: int) -> tuple[Unet, GaussianDiffusion, torch.device]:
        if not 1 <= unet_number <= len(self.unets):
            raise ValueError(f"unet_number must be in [1, {len(self.unets)}], got {unet_number}")
        unet = self.unets[unet_number - 1]
        return unet, self.diffusions[unet_number - 1], next(unet.parameters()).device

    # ---- conditioning ----------------------------------------------------------------------------

    def _conditioning(self, unet: Unet, device, images, text: Text, image_embed, text_encodings, text_mask):
        """Image embed and text encodings for `unet`, from CLIP when they were not given."""
        if self.config.unconditional:
            return None, None, None
        if image_embed is None:
            if images is None or self.clip is None:
                raise ValueError("pass image_embed, or images with a decoder that has CLIP")
            image_embed = self.clip.embed_image(images)
        if unet.config.cond_on_text_encodings:
            if text_encodings is None:
                if text is None or self.clip is None:
                    raise ValueError("this decoder conditions on text: pass text_encodings, or text with CLIP")
                out = self.clip.embed_text(text)
                text_encodings, text_mask = out.text_encodings, out.mask
            text_encodings = text_encodings.to(device)
            text_mask = None if text_mask is None else text_mask.to(device)
        else:
            text_encodings, text_mask = None, None
        return image_embed.to(device).float(), text_encodings, text_mask

    def lowres_condition(
        self, images: Tensor, unet_number: int, noise_times: Optional[Tensor] = None, blur: bool = False,
        generator: Optional[torch.Generator] = None, rng: Optional[RowRandom] = None,
    ) -> tuple[Tensor, Tensor]:
        """The low-res input of an upsampler stage from [0, 1] images, noised to `noise_times`
        (drawn up to `lowres_noise_max` of the schedule when None), and those times. Training's draws come from
        `rng` (each sample's own generator), sampling's noise from `generator`.

        With `blur` (training), as cascaded diffusion augments it: a share `lowres_blur_prob` of the images
        is Gaussian-blurred at the low resolution, each with its own sigma from `lowres_blur_sigma`,
        before it is upsampled (a blur after upsampling would barely touch the low-res content)."""
        _, diffusion, device = self._unet(unet_number)
        c = self.config
        size, previous = c.image_sizes[unet_number - 1], c.image_sizes[unet_number - 2]
        low = resize_image(images.to(device).float(), previous)
        batch = low.shape[0]
        rng = rng or RowRandom(batch, "cpu")
        if blur:
            # imported here: torchvision costs each process ~2 s, and only upsampler training blurs
            from torchvision.transforms.functional import gaussian_blur

            low = torch.stack([
                gaussian_blur(image[None], kernel_size=blur_kernel(sigma), sigma=sigma)[0] if chosen else image
                for image, chosen, sigma in zip(
                    low, (rng.rand() < c.lowres_blur_prob).tolist(), rng.uniform(*c.lowres_blur_sigma).tolist())
            ])
        low = resize_image(low, size)
        if noise_times is None:  # training
            highest = max(int(c.lowres_noise_max * diffusion.timesteps), 0)
            noise_times = rng.randint(highest + 1).to(device)
            noise = rng.randn(*low.shape[1:]).to(device)
        else:
            noise = torch.randn(low.shape, device=device, generator=generator)
        return diffusion.q_sample(low * 2 - 1, noise_times, noise), noise_times

    # ---- training --------------------------------------------------------------------------------

    def forward(
        self,
        image: Tensor,
        text: Text = None,
        image_embed: Optional[Tensor] = None,
        text_encodings: Optional[Tensor] = None,
        text_mask: Optional[Tensor] = None,
        unet_number: int = 1,
        seeds: Optional[Tensor] = None,
    ) -> Tensor:
        """The loss of stage `unet_number` on [0, 1] images; touches no other unet. `seeds` [B]: each sample's own
        random draws (row_random.py), else torch's global generator."""
        unet, diffusion, device = self._unet(unet_number)
        image = image.to(device).float()
        rng = RowRandom(image.shape[0], device, seeds)
        x0 = resize_image(image, self.image_sizes[unet_number - 1]) * 2 - 1
        image_embed, text_encodings, text_mask = self._conditioning(
            unet, device, image, text, image_embed, text_encodings, text_mask
        )
        lowres, lowres_times = (None, None)
        if unet_number > 1:
            lowres, lowres_times = self.lowres_condition(image, unet_number, blur=True, rng=rng)
        crop = (self.config.random_crop_sizes or [None] * len(self.unets))[unet_number - 1]
        if crop is not None:  # the same window of the target and of its low-res input
            x0, lowres = random_crops([x0, lowres], crop, rng)
        image_drop = rng.rand() < self.config.image_cond_drop_prob
        text_drop = rng.rand() < self.config.text_cond_drop_prob

        def model_fn(x: Tensor, t: Tensor) -> Tensor:
            return unet(x, t, image_embed, text_encodings, text_mask, lowres, lowres_times, image_drop, text_drop)

        return diffusion.loss(model_fn, x0, loss_type=self.config.diffusion_for(unet_number - 1).loss_type, rng=rng)

    # ---- sampling --------------------------------------------------------------------------------

    def guided_model_fn(self, unet: Unet, image_embed, text_encodings, text_mask, lowres, lowres_times, cond_scale: float):
        """model_fn(x, t) of one stage with classifier-free guidance (see diffusion.classifier_free_guidance)."""
        if image_embed is None:  # unconditional: nothing to guide by
            cond_scale = 1.0

        def forward(x: Tensor, t: Tensor, drop: Optional[Tensor]) -> Tensor:
            n = x.shape[0] // (image_embed.shape[0] if image_embed is not None else x.shape[0])
            return unet(x, t, tile(image_embed, n), tile(text_encodings, n), tile(text_mask, n), tile(lowres, n),
                        tile(lowres_times, n), drop, drop)

        guided = self.config.channels if unet.config.learned_variance and not self.config.guidance_on_variance else None
        return classifier_free_guidance(forward, cond_scale, guided_channels=guided)

    @torch.no_grad()
    def sample(
        self,
        image_embed: Optional[Tensor] = None,
        text: Text = None,
        text_encodings: Optional[Tensor] = None,
        text_mask: Optional[Tensor] = None,
        batch_size: int = 1,
        cond_scale: float = 1.0,
        start_at_unet_number: int = 1,
        start_image: Optional[Tensor] = None,
        stop_at_unet_number: Optional[int] = None,
        inpaint_image: Optional[Tensor] = None,
        inpaint_mask: Optional[Tensor] = None,
        inpaint_resample_times: int = 5,
        eta: Optional[float] = None,
        generator: Optional[torch.Generator] = None,
        sample_timesteps: Optional[int] = None,
        sampler: Optional[str] = None,
    ) -> Tensor:
        """Run the cascade: [B, C, H, W] images in [0, 1] at the last (or `stop_at_unet_number`) size. Steps,
        sampler and eta default to each unet's diffusion config.

        Inpainting: `inpaint_image` [B, C, H, W] in [0, 1] and `inpaint_mask` [B, H, W] (True = keep).
        Upsampling a given image: `start_at_unet_number=k` with `start_image` [B, C, H, W] in [0, 1], which
        unet k takes as its low-resolution input in place of the stages before it.
        """
        last = stop_at_unet_number or len(self.unets)
        if not 1 <= start_at_unet_number <= last:
            raise ValueError(f"start_at_unet_number must be in [1, {last}], got {start_at_unet_number}")
        if start_at_unet_number > 1 and start_image is None:
            raise ValueError("start_at_unet_number > 1 needs start_image, the images to upsample")
        images = start_image if start_at_unet_number > 1 else None
        batch = image_embed.shape[0] if image_embed is not None else (len(images) if images is not None else batch_size)
        for number in range(start_at_unet_number, last + 1):
            unet, diffusion, device = self._unet(number)
            size = self.image_sizes[number - 1]
            embed, encodings, mask = self._conditioning(unet, device, None, text, image_embed, text_encodings, text_mask)
            lowres = lowres_times = None
            if number > 1:
                level = int(self.config.lowres_sample_noise * diffusion.timesteps)
                lowres_times = torch.full((batch,), level, device=device, dtype=torch.long)
                lowres, _ = self.lowres_condition(images, number, noise_times=lowres_times, generator=generator)
            inpaint = {}
            if inpaint_image is not None:
                if inpaint_mask is None:
                    raise ValueError("inpaint_mask is required with inpaint_image")
                known = F.interpolate(inpaint_mask[:, None].float().to(device), size=(size, size), mode="nearest") > 0.5
                inpaint = dict(inpaint_image=resize_image(inpaint_image.to(device).float(), size) * 2 - 1,
                               inpaint_mask=known, inpaint_resample_times=inpaint_resample_times)
            model_fn = self.guided_model_fn(unet, embed, encodings, mask, lowres, lowres_times, cond_scale)
            d, shape = self.config.diffusion_for(number - 1), (batch, self.config.channels, size, size)
            unet_eta = d.eta if eta is None else eta
            steps, unet_sampler = sample_timesteps or d.sample_timesteps, sampler or d.sampler
            if unet_sampler == "reference" and steps is not None and steps < d.timesteps:
                if inpaint:
                    raise ValueError(f"unet {number} samples with DALLE2-pytorch's DDIM (diffusion.sampler: reference), "
                                     "which does not inpaint here: sample it with ddim or ddpm")
                x = reference_ddim(diffusion, model_fn, shape, kind="decoder", steps=steps, eta=unet_eta,
                                   device=device, x0_transform=self.threshold, generator=generator)
            else:
                reference = unet_sampler == "reference"  # over every step theirs is DDPM, as ours without steps
                x = diffusion.sample(model_fn, shape, device=device, eta=unet_eta, x0_transform=self.threshold,
                                     sample_timesteps=None if reference else steps, generator=generator,
                                     sampler="ddim" if reference else unet_sampler, **inpaint)
            images = (x.clamp(-1, 1) + 1) / 2
        return images

    def threshold(self, x0: Tensor) -> Tensor:
        """Keep a predicted x0 in the image range while sampling: dynamic thresholding, or a plain clamp."""
        percentile = self.config.dynamic_threshold_percentile
        return x0.clamp(-1, 1) if percentile is None else dynamic_threshold(x0, percentile)
