"""DALL-E 2 in PyTorch: CLIP through open_clip, the diffusion prior, the U-Net decoder cascade."""

__version__ = "0.1.0"

from .clip import ClipAdapter, ClipConfig  # noqa: E402
from .configs import DecoderConfig, DiffusionConfig, PriorConfig, PriorNetworkConfig, TrainerConfig, UnetConfig  # noqa: E402
from .decoder import Decoder  # noqa: E402
from .diffusion import GaussianDiffusion  # noqa: E402
from .prior import DiffusionPrior, DiffusionPriorNetwork  # noqa: E402
from .text_to_image import DALLE2, to_pil  # noqa: E402
from .trainer import DecoderTrainer, PriorTrainer  # noqa: E402
from .unet import Unet  # noqa: E402

__all__ = [
    "DALLE2", "ClipAdapter", "ClipConfig", "Decoder", "DecoderConfig", "DecoderTrainer", "Unet", "to_pil", "DiffusionConfig", "DiffusionPrior", "DiffusionPriorNetwork",
    "GaussianDiffusion", "PriorConfig", "PriorNetworkConfig", "PriorTrainer", "TrainerConfig", "UnetConfig",
]
