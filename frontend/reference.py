"""Builtin reference models: DiTs trained and shipped by this project.

``flux-fmnist`` is a diffusers ``FluxTransformer2DModel`` trained as a class-conditional
rectified-flow model on Fashion-MNIST in pixel space: images are padded to 32x32 and packed 2x2
into 256 tokens of 4 channels, as Flux packs VAE latents. The class enters as text tokens
(``encoder_hidden_states``) and as the pooled projection, both looked up in a learned
:class:`ClassConditioner` table whose last row is the null class used for classifier-free
guidance. The shipped folder is

    models/flux-fmnist/
        transformer/config.json, transformer/diffusion_pytorch_model.safetensors   (a diffusers folder)
        conditioner.safetensors                                                    (the class tables)
        adatsq_model.json      (classes, image geometry, default schedule, training record)
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..errors import InputError
from .schedule import Schedule

FMNIST_CLASSES = ("t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                  "ankle boot")

#: the transformer config of flux-fmnist (chosen by measuring CPU sampling speed; see README)
FLUX_FMNIST_CONFIG = dict(patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=64,
                          num_attention_heads=3, joint_attention_dim=64, pooled_projection_dim=64,
                          guidance_embeds=False, axes_dims_rope=(16, 24, 24))
TEXT_TOKENS = 4
IMAGE_SIZE = 32
PACK = 2


class ClassConditioner(nn.Module):
    """Class id -> (text tokens [L, D], pooled vector [P]); id ``num_classes`` is the null class."""

    def __init__(self, num_classes: int, text_tokens: int, text_dim: int, pooled_dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.tokens = nn.Parameter(torch.randn(num_classes + 1, text_tokens, text_dim) * 0.02)
        self.pooled = nn.Parameter(torch.randn(num_classes + 1, pooled_dim) * 0.02)

    @property
    def null_class(self) -> int:
        return self.num_classes

    def forward(self, class_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tokens[class_ids], self.pooled[class_ids]


def pack(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), 4C], the Flux latent packing."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // PACK, PACK, w // PACK, PACK).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // PACK) * (w // PACK), c * PACK * PACK)


def unpack(tokens: torch.Tensor, h: int, w: int, c: int = 1) -> torch.Tensor:
    b = tokens.shape[0]
    x = tokens.view(b, h // PACK, w // PACK, c, PACK, PACK).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, h, w)


def image_ids(h: int = IMAGE_SIZE, w: int = IMAGE_SIZE) -> torch.Tensor:
    ids = torch.zeros(h // PACK, w // PACK, 3)
    ids[..., 1] = torch.arange(h // PACK)[:, None]
    ids[..., 2] = torch.arange(w // PACK)[None, :]
    return ids.reshape(-1, 3)


class FluxFMNIST(nn.Module):
    """Denoiser: (images [B,1,32,32], sigma [B], class ids [B]) -> velocity [B,1,32,32]."""

    def __init__(self, transformer: nn.Module, conditioner: ClassConditioner):
        super().__init__()
        self.transformer = transformer
        self.conditioner = conditioner
        self.register_buffer("img_ids", image_ids(), persistent=False)
        self.register_buffer("txt_ids", torch.zeros(conditioner.tokens.shape[1], 3), persistent=False)

    @classmethod
    def new(cls, seed: int = 0) -> "FluxFMNIST":
        import diffusers

        torch.manual_seed(seed)
        transformer = diffusers.FluxTransformer2DModel(**FLUX_FMNIST_CONFIG)
        cond = ClassConditioner(len(FMNIST_CLASSES), TEXT_TOKENS, FLUX_FMNIST_CONFIG["joint_attention_dim"],
                                FLUX_FMNIST_CONFIG["pooled_projection_dim"])
        return cls(transformer, cond)

    # Denoiser protocol
    def latent_shape(self) -> tuple[int, ...]:
        return (1, IMAGE_SIZE, IMAGE_SIZE)

    def null_condition(self, batch: int) -> torch.Tensor:
        return torch.full((batch,), self.conditioner.null_class, dtype=torch.long)

    def transformer_inputs(self, x: torch.Tensor, sigma: torch.Tensor, class_ids: torch.Tensor) -> dict:
        """The keyword inputs of the diffusers transformer for this batch (what export and
        calibration see)."""
        tokens, pooled = self.conditioner(class_ids)
        return dict(hidden_states=pack(x), encoder_hidden_states=tokens, pooled_projections=pooled,
                    timestep=sigma.to(x.dtype), img_ids=self.img_ids, txt_ids=self.txt_ids)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
        dev = self.img_ids.device
        if x.device != dev:  # the model lives elsewhere (a GPU): latents cross the interface on their device
            return self.forward(x.to(dev), sigma.to(dev), class_ids.to(dev)).to(x.device)
        out = self.transformer(**self.transformer_inputs(x, sigma, class_ids), return_dict=False)[0]
        return unpack(out, x.shape[-2], x.shape[-1], x.shape[1])


@dataclasses.dataclass(frozen=True)
class ReferenceModel:
    name: str
    denoiser: FluxFMNIST
    classes: tuple[str, ...]
    schedule: Schedule
    info: Mapping[str, Any]
    folder: Path

    def class_id(self, name_or_id: str | int) -> int:
        if isinstance(name_or_id, int) or str(name_or_id).isdigit():
            k = int(name_or_id)
            if not 0 <= k < len(self.classes):
                raise InputError(f"{self.name}: class id {k} out of range 0..{len(self.classes) - 1}")
            return k
        if name_or_id not in self.classes:
            raise InputError(f"{self.name}: unknown class {name_or_id!r}; classes: {', '.join(self.classes)}")
        return self.classes.index(name_or_id)


def reference_folder(name: str) -> Path:
    from ..models import MODELS_DIR

    return MODELS_DIR / name


def save_reference(folder: str | Path, model: FluxFMNIST, schedule: Schedule, info: Mapping[str, Any],
                   name: str = "flux-fmnist") -> None:
    """Write the shipped folder (transformer as a diffusers folder, conditioner, adatsq_model.json)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    (folder / "transformer").mkdir(parents=True, exist_ok=True)
    model.transformer.save_pretrained(folder / "transformer", safe_serialization=True)
    save_file({k: v.detach().contiguous() for k, v in model.conditioner.state_dict().items()},
              str(folder / "conditioner.safetensors"))
    card = dict(name=name, kind="flux-fmnist", classes=list(FMNIST_CLASSES), image_size=IMAGE_SIZE,
                text_tokens=TEXT_TOKENS, schedule=schedule.to_json(), **dict(info))
    from ..tools.io import atomic_write_text

    atomic_write_text(folder / "adatsq_model.json", json.dumps(card, indent=1))


def load_reference(name_or_folder: str | Path = "flux-fmnist") -> ReferenceModel:
    """Load a shipped reference model by name (``flux-fmnist``) or from a folder."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .loading import load_folder

    folder = Path(name_or_folder)
    if not folder.exists():
        folder = reference_folder(str(name_or_folder))
    card_path = folder / "adatsq_model.json"
    if not card_path.is_file():
        raise InputError(f"{card_path}: missing; not an adatsq reference model folder "
                         f"(did `git lfs`/packaging drop models/{folder.name}?)")
    try:
        card = json.loads(card_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{card_path}: not valid JSON ({exc})") from None
    transformer = load_folder(folder / "transformer")
    if next(transformer.parameters()).dtype != torch.float32:
        transformer = transformer.float()
    cond_path = folder / "conditioner.safetensors"
    try:
        state = load_file(str(cond_path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise InputError(f"{cond_path}: missing, corrupt or truncated ({exc})") from None
    classes = tuple(card["classes"])
    if "tokens" not in state or "pooled" not in state or state["tokens"].shape[0] != len(classes) + 1:
        raise InputError(f"{cond_path}: does not hold a conditioner for {len(classes)} classes + null")
    cond = ClassConditioner(len(classes), state["tokens"].shape[1], state["tokens"].shape[2], state["pooled"].shape[1])
    cond.load_state_dict({k: v.float() for k, v in state.items()})
    model = FluxFMNIST(transformer, cond).eval()
    return ReferenceModel(card.get("name", folder.name), model, classes, Schedule.from_json(card["schedule"]),
                          card, folder)
