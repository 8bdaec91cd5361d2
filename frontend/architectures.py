"""Signature adapters: one per supported diffusers transformer class.

An adapter knows how to call its architecture with plain tensors (``wrap``), builds example inputs
for a sampling resolution from the model's config (so a user never writes them by hand), says
which dimensions may be dynamic, checks that a resolution fits the patch size, and carries the
builtin tiny random-init config used by tests and ``adatsq inspect tiny-*``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import torch
from torch import nn
from torch.export import Dim

from ..errors import InputError, UnsupportedArchitectureError


@dataclasses.dataclass(frozen=True)
class Resolution:
    """A sampling resolution in *latent* units.

    ``height``/``width`` are the latent (VAE-space) spatial sizes, ``text_len`` the number of text
    tokens, ``frames`` the number of latent frames (video models only), ``batch`` the example batch.
    """

    height: int = 16
    width: int = 16
    text_len: int = 8
    frames: int = 1
    batch: int = 2

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise InputError(f"resolution: {f.name} must be a positive integer, got {v!r}")


class TransformerCall(nn.Module):
    """Wraps a diffusers transformer so that ``forward(*tensors)`` returns one tensor.

    Inputs are positional, in the order of ``input_names`` (the keys of the adapter's example
    inputs). The transformer is held as ``self.transformer``; parameter names in the exported
    graph are therefore ``transformer.<diffusers name>``, which :func:`param_name` strips.
    """

    PREFIX = "transformer."

    def __init__(self, transformer: nn.Module, call: Callable[..., torch.Tensor], input_names: tuple[str, ...]):
        super().__init__()
        self.transformer = transformer
        self._call = call
        self.input_names = tuple(input_names)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self._call(self.transformer, **dict(zip(self.input_names, inputs)))


def param_name(graph_name: str) -> str:
    return graph_name[len(TransformerCall.PREFIX):] if graph_name.startswith(TransformerCall.PREFIX) else graph_name


@dataclasses.dataclass(frozen=True)
class Adapter:
    arch: str  # the diffusers class name
    builtin: str  # tiny builtin name
    tiny_config: Mapping[str, Any]
    default_resolution: Resolution
    #: (model, res, generator) -> example inputs (keyword tensors, order = ONNX input order)
    make_inputs: Callable[[nn.Module, Resolution, torch.Generator], dict[str, torch.Tensor]]
    #: (model, **inputs) -> output tensor
    call: Callable[..., torch.Tensor]
    #: (model, res) -> dynamic_shapes dict for torch.export (None: fully static)
    dynamic_shapes: Callable[[nn.Module, Resolution], dict | None]
    #: (config, res) -> None or raise InputError
    check: Callable[[Mapping[str, Any], Resolution], None]
    #: names of graph fix-up passes (frontend.fixups) to run after export
    fixups: tuple[str, ...] = ()
    #: True if the model is a video model (frames are meaningful)
    video: bool = False

    def model_class(self):
        import diffusers

        return getattr(diffusers, self.arch)

    def tiny(self, seed: int = 0) -> nn.Module:
        """The builtin tiny random-init model (deterministic for a seed)."""
        torch.manual_seed(seed)
        model = self.model_class()(**dict(self.tiny_config))
        return model.eval()

    def example_inputs(self, model: nn.Module, res: Resolution, seed: int = 0) -> dict[str, torch.Tensor]:
        self.check(model.config, res)
        gen = torch.Generator().manual_seed(seed)
        p = next(model.parameters())
        inputs = self.make_inputs(model, res, gen)  # drawn on the CPU: the same values on any device
        return {k: (v.to(p.device, p.dtype) if v.is_floating_point() else v.to(p.device)) for k, v in inputs.items()}

    def wrap(self, model: nn.Module, input_names: tuple[str, ...]) -> TransformerCall:
        return TransformerCall(model, self.call, input_names)


# --------------------------------------------------------------------------- helpers
def _randn(gen, *shape):
    return torch.randn(*shape, generator=gen)


def _patch(config, key="patch_size"):
    p = config.get(key, 1)
    return tuple(p) if isinstance(p, (list, tuple)) else (p, p)


def _check_divisible(arch, res: Resolution, ph: int, pw: int, pf: int = 1, note=""):
    bad = [(n, v, p) for n, v, p in (("height", res.height, ph), ("width", res.width, pw), ("frames", res.frames, pf))
           if v % p]
    if bad:
        n, v, p = bad[0]
        raise InputError(f"{arch}: latent {n} {v} is not a multiple of the patch size {p}{note}")


def _batch():
    return Dim("batch", min=1, max=1024)


def _text():
    return Dim("text_len", min=2, max=4096)


def _spatial(p: int, name: str):
    # dimensions that must be multiples of the patch size are exported as p * Dim
    return Dim(f"{name}_patches", min=2, max=512) * p if p > 1 else Dim(name, min=2, max=4096)


# --------------------------------------------------------------------------- Flux
def _flux_inputs(model, res, gen):
    c = model.config
    b, h2, w2 = res.batch, res.height // 2, res.width // 2
    ids = torch.zeros(h2, w2, 3)
    ids[..., 1] = torch.arange(h2)[:, None]
    ids[..., 2] = torch.arange(w2)[None, :]
    inputs = dict(
        hidden_states=_randn(gen, b, h2 * w2, c.in_channels),
        encoder_hidden_states=_randn(gen, b, res.text_len, c.joint_attention_dim),
        pooled_projections=_randn(gen, b, c.pooled_projection_dim),
        timestep=torch.rand(b, generator=gen),
        img_ids=ids.reshape(h2 * w2, 3),
        txt_ids=torch.zeros(res.text_len, 3),
    )
    if c.guidance_embeds:
        inputs["guidance"] = torch.full((b,), 3.5)
    return inputs


def _flux_call(m, **kw):
    return m(**kw, return_dict=False)[0]


def _flux_dynamic(model, res):
    b, n, t = _batch(), Dim("image_tokens", min=4, max=65536), _text()
    d = dict(hidden_states={0: b, 1: n}, encoder_hidden_states={0: b, 1: t}, pooled_projections={0: b},
             timestep={0: b}, img_ids={0: n}, txt_ids={0: t})
    if model.config.guidance_embeds:
        d["guidance"] = {0: b}
    return d


def _flux_check(config, res):
    # Flux pipelines pack 2x2 latent patches into one token (in_channels = 4 * latent channels).
    _check_divisible("FluxTransformer2DModel", res, 2, 2, note=" (Flux packs 2x2 latent patches)")


# --------------------------------------------------------------------------- SD3
def _sd3_inputs(model, res, gen):
    c, b = model.config, res.batch
    return dict(
        hidden_states=_randn(gen, b, c.in_channels, res.height, res.width),
        encoder_hidden_states=_randn(gen, b, res.text_len, c.joint_attention_dim),
        pooled_projections=_randn(gen, b, c.pooled_projection_dim),
        timestep=torch.rand(b, generator=gen) * 1000,
    )


def _sd3_check(config, res):
    p = config["patch_size"]
    _check_divisible("SD3Transformer2DModel", res, p, p)
    limit = config["pos_embed_max_size"] * p
    if res.height > limit or res.width > limit:
        raise InputError(f"SD3Transformer2DModel: latent {res.height}x{res.width} exceeds pos_embed_max_size "
                         f"{config['pos_embed_max_size']} patches ({limit} latent pixels)")


def _sd3_dynamic(model, res):
    b, t, p = _batch(), _text(), model.config.patch_size
    return dict(hidden_states={0: b, 2: _spatial(p, "height"), 3: _spatial(p, "width")},
                encoder_hidden_states={0: b, 1: t}, pooled_projections={0: b}, timestep={0: b})


# --------------------------------------------------------------------------- PixArt
def _pixart_inputs(model, res, gen):
    c, b = model.config, res.batch
    return dict(
        hidden_states=_randn(gen, b, c.in_channels, res.height, res.width),
        encoder_hidden_states=_randn(gen, b, res.text_len, c.caption_channels),
        timestep=torch.randint(0, 1000, (b,), generator=gen),
    )


def _pixart_call(m, hidden_states, encoder_hidden_states, timestep):
    return m(hidden_states, encoder_hidden_states=encoder_hidden_states, timestep=timestep,
             added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]


def _conv2d_check(arch):
    def check(config, res):
        p = config["patch_size"]
        _check_divisible(arch, res, p, p)

    return check


def _pixart_dynamic(model, res):
    b, t = _batch(), _text()
    return dict(hidden_states={0: b}, encoder_hidden_states={0: b, 1: t}, timestep={0: b})


# --------------------------------------------------------------------------- DiT
def _dit_inputs(model, res, gen):
    c, b = model.config, res.batch
    return dict(
        hidden_states=_randn(gen, b, c.in_channels, res.height, res.width),
        timestep=torch.randint(0, 1000, (b,), generator=gen),
        class_labels=torch.randint(0, c.num_embeds_ada_norm, (b,), generator=gen),
    )


def _dit_dynamic(model, res):
    b = _batch()
    return dict(hidden_states={0: b}, timestep={0: b}, class_labels={0: b})


# --------------------------------------------------------------------------- Wan
def _wan_inputs(model, res, gen):
    c, b = model.config, res.batch
    return dict(
        hidden_states=_randn(gen, b, c.in_channels, res.frames, res.height, res.width),
        timestep=torch.rand(b, generator=gen) * 1000,
        encoder_hidden_states=_randn(gen, b, res.text_len, c.text_dim),
    )


def _wan_check(config, res):
    pf, ph, pw = config["patch_size"]
    _check_divisible("WanTransformer3DModel", res, ph, pw, pf)


def _wan_dynamic(model, res):
    b, t = _batch(), _text()
    pf, ph, pw = model.config.patch_size
    hs = {0: b, 3: _spatial(ph, "height"), 4: _spatial(pw, "width")}
    if res.frames >= 2 and pf == 1:
        # RoPE tables bound the frame count; a 1-frame example would be specialised (0/1 rule),
        # so frames are dynamic only for video resolutions.
        hs[2] = Dim("frames", min=2, max=model.config.rope_max_seq_len)
    return dict(hidden_states=hs, timestep={0: b}, encoder_hidden_states={0: b, 1: t})


# --------------------------------------------------------------------------- Z-Image
def _zimage_inputs(model, res, gen):
    c, b = model.config, res.batch
    return dict(
        x=_randn(gen, b, c.in_channels, res.frames, res.height, res.width),
        t=torch.rand(b, generator=gen),
        cap_feats=_randn(gen, b, res.text_len, c.cap_feat_dim),
    )


def _zimage_call(m, x, t, cap_feats):
    # Z-Image takes Python lists of per-sample tensors; the list length (batch) is therefore static.
    out = m(list(x.unbind(0)), t, list(cap_feats.unbind(0)), return_dict=False)[0]
    return torch.stack(out, 0)


def _zimage_check(config, res):
    _check_divisible("ZImageTransformer2DModel", res, config["all_patch_size"][0], config["all_patch_size"][0],
                     config["all_f_patch_size"][0])


def _static(model, res):
    return None


ADAPTERS: dict[str, Adapter] = {}


def _register(a: Adapter):
    ADAPTERS[a.arch] = a


_register(Adapter(
    arch="FluxTransformer2DModel", builtin="tiny-flux",
    tiny_config=dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                     num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
                     axes_dims_rope=(4, 6, 6)),
    default_resolution=Resolution(16, 16, 8), make_inputs=_flux_inputs, call=_flux_call,
    dynamic_shapes=_flux_dynamic, check=_flux_check))
_register(Adapter(
    arch="SD3Transformer2DModel", builtin="tiny-sd3",
    tiny_config=dict(sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16,
                     num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=64,
                     pooled_projection_dim=32, out_channels=4, pos_embed_max_size=16),
    default_resolution=Resolution(16, 16, 8), make_inputs=_sd3_inputs, call=_flux_call,
    dynamic_shapes=_sd3_dynamic, check=_sd3_check))
_register(Adapter(
    arch="PixArtTransformer2DModel", builtin="tiny-pixart",
    tiny_config=dict(sample_size=16, num_layers=2, patch_size=2, attention_head_dim=16, num_attention_heads=4,
                     caption_channels=32, in_channels=4, cross_attention_dim=64, out_channels=8,
                     attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                     norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
                     use_additional_conditions=False),
    default_resolution=Resolution(16, 16, 8), make_inputs=_pixart_inputs, call=_pixart_call,
    dynamic_shapes=_pixart_dynamic, check=_conv2d_check("PixArtTransformer2DModel"),
    fixups=("RemoveNoopSqueeze",)))
_register(Adapter(
    arch="DiTTransformer2DModel", builtin="tiny-dit",
    tiny_config=dict(sample_size=16, num_layers=2, patch_size=2, attention_head_dim=16, num_attention_heads=4,
                     in_channels=4, out_channels=8, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                     norm_type="ada_norm_zero", norm_elementwise_affine=False),
    default_resolution=Resolution(16, 16, 1), make_inputs=_dit_inputs, call=_flux_call,
    dynamic_shapes=_dit_dynamic, check=_conv2d_check("DiTTransformer2DModel")))
_register(Adapter(
    arch="WanTransformer3DModel", builtin="tiny-wan",
    tiny_config=dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=16, in_channels=4,
                     out_channels=4, text_dim=32, freq_dim=64, ffn_dim=128, num_layers=2, cross_attn_norm=True,
                     qk_norm="rms_norm_across_heads", rope_max_seq_len=64),
    default_resolution=Resolution(16, 16, 8, frames=3), make_inputs=_wan_inputs, call=_flux_call,
    dynamic_shapes=_wan_dynamic, check=_wan_check, video=True))
_register(Adapter(
    arch="ZImageTransformer2DModel", builtin="tiny-zimage",
    tiny_config=dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=64, n_layers=2,
                     n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=32, axes_dims=[8, 12, 12],
                     axes_lens=[256, 64, 64]),
    default_resolution=Resolution(16, 16, 8), make_inputs=_zimage_inputs, call=_zimage_call,
    dynamic_shapes=_static, check=_zimage_check, fixups=("LowerComplexToReal",)))

BUILTINS: dict[str, Adapter] = {a.builtin: a for a in ADAPTERS.values()}


def adapter_for(model_or_class: Any) -> Adapter:
    name = model_or_class if isinstance(model_or_class, str) else (
        model_or_class.__name__ if isinstance(model_or_class, type) else type(model_or_class).__name__)
    try:
        return ADAPTERS[name]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"unsupported architecture {name!r}; supported: {', '.join(sorted(ADAPTERS))}") from None
