"""The diffusion prior: a causal transformer that denoises CLIP image embeddings given the text.

DALL-E 2 (Ramesh et al. 2022, section 2.2): the prior sees the sequence
[text encodings..., text embed, time, noised image embed, query] and reads the denoised image
embedding off the final token. It predicts x0 directly, on image embeddings scaled to norm sqrt(dim).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .configs import PriorConfig, PriorNetworkConfig, with_diffusion_kwargs
from .diffusion import GaussianDiffusion, classifier_free_guidance, tile
from .layers import Attention, Checkpointable, FeedForward, l2norm, time_mlp
from .reference_sampling import reference_ddim
from .row_random import RowRandom


class TransformerBlock(nn.Module):
    """Pre-norm causal self-attention and feed-forward."""

    def __init__(self, c: PriorNetworkConfig):
        super().__init__()
        self.attn_norm = nn.LayerNorm(c.dim)
        self.attn = Attention(c.dim, heads=c.heads, dim_head=c.dim_head, dropout=c.dropout)
        self.ff_norm = nn.LayerNorm(c.dim)
        self.ff = FeedForward(c.dim, mult=c.ff_mult, dropout=c.dropout)

    def forward(self, x: Tensor, last_only: bool = False) -> Tensor:
        """x: [B, N, dim] -> [B, N, dim]; `last_only`: [B, 1, dim], the final token alone, the only one a last
        block need compute (the prior reads nothing else): a sixth fewer FLOPs at depth 4."""
        normed = self.attn_norm(x)
        if last_only:  # the final token may attend to every token, so no mask: keys and values from all of them
            x = x[:, -1:] + self.attn(normed[:, -1:], context=normed)
        else:
            x = x + self.attn(normed, causal=True)
        return x + self.ff(self.ff_norm(x))


class DiffusionPriorNetwork(Checkpointable, nn.Module):
    """Causal transformer over (text encodings, text embed, time, noised image embed, query)."""

    def __init__(self, config: Optional[PriorNetworkConfig] = None, **kwargs):
        super().__init__()
        c = self.config = config if config is not None else PriorNetworkConfig(**kwargs)
        embed_dim, enc_dim = c.resolved_embed_dim, c.resolved_text_encoding_dim
        self.to_text_embed = nn.Linear(embed_dim, c.dim)
        self.to_image_embed = nn.Linear(embed_dim, c.dim)
        self.to_text_encodings = nn.Linear(enc_dim, c.dim)
        self.to_time = time_mlp(c.dim, c.dim)
        self.query = nn.Parameter(torch.randn(c.dim) * 0.02)
        # Learned stand-ins for dropped conditioning (classifier-free guidance) and for padded tokens.
        self.null_text_embed = nn.Parameter(torch.randn(c.dim) * 0.02)
        self.null_text_encodings = nn.Parameter(torch.randn(c.max_text_len, c.dim) * 0.02)
        self.pos_emb = nn.Parameter(torch.randn(c.max_text_len + 4, c.dim) * 0.02)
        self.blocks = nn.ModuleList(TransformerBlock(c) for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.dim)
        self.to_out = nn.Linear(c.dim, embed_dim)

    def forward(
        self,
        image_embed: Tensor,
        t: Tensor,
        text_embed: Tensor,
        text_encodings: Optional[Tensor] = None,
        text_mask: Optional[Tensor] = None,
        cond_drop_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """Predict from a noised `image_embed` [B, D] at steps `t` [B]; `cond_drop_mask` [B] True drops the text."""
        batch = image_embed.shape[0]
        drop = torch.zeros(batch, dtype=torch.bool, device=image_embed.device) if cond_drop_mask is None else cond_drop_mask

        text_token = torch.where(drop[:, None], self.null_text_embed, self.to_text_embed(text_embed))
        tokens = [text_token[:, None], self.to_time(t)[:, None], self.to_image_embed(image_embed)[:, None]]
        if text_encodings is not None:
            length = text_encodings.shape[1]
            if length > self.config.max_text_len:
                raise ValueError(f"text_encodings has {length} tokens, more than max_text_len={self.config.max_text_len}")
            keep = torch.ones(batch, length, dtype=torch.bool, device=image_embed.device) if text_mask is None else text_mask
            keep = keep & ~drop[:, None]
            # Padded and dropped positions get learned null tokens rather than a key mask, so every
            # causal row keeps at least one valid key.
            encodings = torch.where(keep[..., None], self.to_text_encodings(text_encodings), self.null_text_encodings[:length])
            tokens.insert(0, encodings)
        tokens.append(self.query.expand(batch, 1, -1))

        x = torch.cat(tokens, dim=1)
        x = x + self.pos_emb[: x.shape[1]]
        for i, block in enumerate(self.blocks):
            x = self.checkpointed(block, x, last_only=i == len(self.blocks) - 1)
        return self.to_out(self.norm(x[:, -1]))


def build_prior_network(config: PriorNetworkConfig) -> nn.Module:
    """The network of `config.arch`: compact (above) or reference (DALLE2-pytorch's, reference_prior.py)."""
    if config.arch == "reference":
        from .reference_prior import ReferencePriorNetwork

        return ReferencePriorNetwork(config)
    return DiffusionPriorNetwork(config)


class DiffusionPrior(nn.Module):
    """Text embedding -> CLIP image embedding by diffusion; trains through CLIP or on precomputed embeds."""

    def __init__(
        self,
        net: Optional[nn.Module] = None,
        clip: Optional[nn.Module] = None,
        config: Optional[PriorConfig] = None,
        **kwargs,
    ):
        super().__init__()
        if config is None:
            fields = with_diffusion_kwargs(PriorConfig, kwargs)
            if net is not None:
                fields["net"] = net.config
            config = PriorConfig(**fields)
        self.config = config
        self.net = net if net is not None else build_prior_network(config.net)
        self.clip = clip
        self.image_embed_dim = config.net.resolved_embed_dim
        if clip is not None and clip.embed_dim != self.image_embed_dim:
            raise ValueError(f"CLIP embeds to {clip.embed_dim} dims but the prior's image_embed_dim is {self.image_embed_dim}")
        if clip is not None:
            clip.requires_grad_(False)
        d = config.diffusion
        self.diffusion = GaussianDiffusion(d.timesteps, d.beta_schedule, config.predict, d.p2_loss_weight_gamma, d.p2_loss_weight_k)
        # The paper scales image embeds to norm sqrt(D), so each component has about unit variance.
        self.image_embed_scale = self.image_embed_dim**0.5

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def encode_text(self, text: Union[Sequence[str], Tensor]) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        """CLIP text embed, and text encodings with their mask when the prior conditions on them."""
        if self.clip is None:
            raise ValueError("the prior has no CLIP: pass text_embed (and text_encodings) instead of text")
        out = self.clip.embed_text(text)
        if self.config.condition_on_text_encodings:
            return out.text_embed, out.text_encodings, out.mask
        return out.text_embed, None, None

    def _conditioning(self, text, text_embed, text_encodings, text_mask):
        if text_embed is None:
            if text is None:
                raise ValueError("pass either text or text_embed")
            text_embed, text_encodings, text_mask = self.encode_text(text)
        if self.config.condition_on_text_encodings and text_encodings is None:
            raise ValueError("condition_on_text_encodings is set: pass text_encodings (or text, with CLIP)")
        if not self.config.condition_on_text_encodings:
            text_encodings, text_mask = None, None
        return text_embed.float(), text_encodings, text_mask

    def forward(
        self,
        text: Union[Sequence[str], Tensor, None] = None,
        image: Optional[Tensor] = None,
        text_embed: Optional[Tensor] = None,
        image_embed: Optional[Tensor] = None,
        text_encodings: Optional[Tensor] = None,
        text_mask: Optional[Tensor] = None,
        seeds: Optional[Tensor] = None,
    ) -> Tensor:
        """The training loss on a batch of (text, image) or precomputed (text_embed, image_embed); `seeds` [B]: each
        sample's own random draws (row_random.py), else torch's global generator."""
        text_embed, text_encodings, text_mask = self._conditioning(text, text_embed, text_encodings, text_mask)
        if image_embed is None:
            if image is None or self.clip is None:
                raise ValueError("pass image_embed, or image with a prior that has CLIP")
            image_embed = self.clip.embed_image(image)
        x0 = l2norm(image_embed.float()) * self.image_embed_scale
        rng = RowRandom(x0.shape[0], x0.device, seeds)
        drop = rng.rand() < self.config.cond_drop_prob

        def model_fn(x: Tensor, t: Tensor) -> Tensor:
            return self.net(x, t, text_embed, text_encodings, text_mask, cond_drop_mask=drop)

        return self.diffusion.loss(model_fn, x0, loss_type=self.config.diffusion.loss_type, rng=rng)

    def guided_model_fn(self, text_embed: Tensor, text_encodings, text_mask, cond_scale: float,
                        negative: Optional[tuple] = None):
        """model_fn(x, t) with classifier-free guidance (see diffusion.classifier_free_guidance); with `negative`
        (text embed, encodings, mask of a negative prompt) guidance moves away from that prompt instead of from
        the null conditioning."""

        def forward(x: Tensor, t: Tensor, drop: Optional[Tensor]) -> Tensor:
            n = x.shape[0] // text_embed.shape[0]
            if negative is None or drop is None:
                return self.net(x, t, tile(text_embed, n), tile(text_encodings, n), tile(text_mask, n),
                                cond_drop_mask=drop)
            # the rows guidance would drop the conditioning of are conditioned on the negative prompt instead
            def pick(positive: Optional[Tensor], negative_part: Optional[Tensor]) -> Optional[Tensor]:
                if positive is None:
                    return None
                rows = drop.reshape(-1, *([1] * (positive.ndim - 1)))
                return torch.where(rows, tile(negative_part, n), tile(positive, n))

            return self.net(x, t, pick(text_embed, negative[0]), pick(text_encodings, negative[1]),
                            pick(text_mask, negative[2]), cond_drop_mask=None)

        return classifier_free_guidance(forward, cond_scale)

    @torch.no_grad()
    def sample(
        self,
        text: Union[Sequence[str], Tensor, None] = None,
        text_embed: Optional[Tensor] = None,
        text_encodings: Optional[Tensor] = None,
        text_mask: Optional[Tensor] = None,
        cond_scale: float = 1.0,
        sample_timesteps: Optional[int] = None,
        num_samples_per_batch: Optional[int] = None,
        eta: Optional[float] = None,
        generator: Optional[torch.Generator] = None,
        sampler: Optional[str] = None,
        negative_text: Union[Sequence[str], Tensor, None] = None,
    ) -> Tensor:
        """Unit-norm image embeds [B, D]; draws several per text and keeps the closest to the text embed. Steps,
        sampler and eta default to the config's `diffusion`. `negative_text` (one per text, needs CLIP and
        cond_scale != 1) takes the place of the null conditioning in guidance: samples move away from it."""
        text_embed, text_encodings, text_mask = self._conditioning(text, text_embed, text_encodings, text_mask)
        n = num_samples_per_batch or self.config.num_samples_per_batch
        batch = text_embed.shape[0]

        def repeat(z: Optional[Tensor]) -> Optional[Tensor]:
            return None if z is None else z.repeat_interleave(n, dim=0)

        negative = None
        if negative_text is not None:
            if len(negative_text) != batch:
                raise ValueError(f"{len(negative_text)} negative texts for {batch} texts: give one per text")
            negative = tuple(repeat(z) for z in self._conditioning(negative_text, None, None, None))
        model_fn = self.guided_model_fn(repeat(text_embed), repeat(text_encodings), repeat(text_mask), cond_scale,
                                        negative=negative)
        clamp = (lambda x0: l2norm(x0) * self.image_embed_scale) if self.config.sampling_clamp_l2norm else None
        d = self.config.diffusion
        steps, eta, sampler = sample_timesteps or d.sample_timesteps, d.eta if eta is None else eta, sampler or d.sampler
        shape = (batch * n, self.image_embed_dim)
        if sampler == "reference" and steps is not None and steps < d.timesteps:
            samples = reference_ddim(self.diffusion, model_fn, shape, kind="prior", steps=steps, eta=eta,
                                     device=text_embed.device, x0_transform=clamp, generator=generator)
        else:
            reference = sampler == "reference"  # over every step theirs is DDPM, as ours without sample_timesteps
            samples = self.diffusion.sample(model_fn, shape, device=text_embed.device, eta=eta, x0_transform=clamp,
                                            sample_timesteps=None if reference else steps, generator=generator,
                                            sampler="ddim" if reference else sampler)
        samples = l2norm(samples).view(batch, n, -1)
        if n == 1:
            return samples[:, 0]
        similarity = torch.einsum("bnd,bd->bn", samples, l2norm(text_embed))
        best = similarity.argmax(dim=1)
        return samples[torch.arange(batch, device=samples.device), best]
