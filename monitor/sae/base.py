"""The SAE contract: an affine encoder and decoder, and one activation per architecture.

Every architecture shares W_enc/b_enc/W_dec/b_dec and the input convention (normalise, then
subtract b_dec if the format says so); a kind adds only its activation and config. Tensors are
checked once here (names, shapes, finite values), so loaders only rename and transpose, and every
error names the file it is about.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from monitor.domain import HookPoint


class SAEError(ValueError):
    """An SAE artifact latentwatch cannot use; the message starts with the file it is about."""


Normalisation = Literal["none", "constant_norm_rescale", "layer_norm"]
NORMALISATIONS: tuple[str, ...] = ("none", "constant_norm_rescale", "layer_norm")
LAYER_NORM_EPS = 1e-5  # SAELens' run-time layer norm


@dataclass(frozen=True)
class SAEConfig:
    """What every architecture needs to turn model activations into latents."""

    d_in: int
    d_sae: int
    hook_point: HookPoint
    apply_b_dec_to_input: bool = False
    # Run-time normalisation of each token's input (SAELens); a fixed scale is folded into the weights.
    normalize_activations: Normalisation = "none"


Shapes = dict[str, tuple[str, ...]]
BASE_SHAPES: Shapes = {"W_enc": ("d_in", "d_sae"), "b_enc": ("d_sae",), "W_dec": ("d_sae", "d_in"), "b_dec": ("d_in",)}


class SAE(ABC):
    """One sparse autoencoder at one hook point. Immutable: `to` and `restrict` build new ones."""

    kind: ClassVar[str]
    config_cls: ClassVar[type[SAEConfig]]
    extra_shapes: ClassVar[Shapes] = {}  # per-kind tensors (e.g. JumpReLU's threshold)
    # Whether a latent's activation depends on its own pre-activation alone (ReLU, JumpReLU): then a
    # subset of latents costs only their encoder columns. TopK ranks all latents against each other.
    per_latent: ClassVar[bool] = True

    W_enc: torch.Tensor  # [d_in, d_sae]
    b_enc: torch.Tensor  # [d_sae]
    W_dec: torch.Tensor  # [d_sae, d_in]
    b_dec: torch.Tensor  # [d_in]

    def __init__(self, config: SAEConfig, tensors: dict[str, torch.Tensor], *, source: str = "<memory>",
                 id: str = ""):
        if not isinstance(config, self.config_cls):
            raise TypeError(f"a {self.kind} SAE needs a {self.config_cls.__name__}, got {type(config).__name__}")
        self.config, self.source = config, source
        self.id = id  # how requests, packs and records name it (monitor.sae.store); "" until it has one
        shapes = self.shapes()
        missing = [name for name in shapes if name not in tensors]
        if missing:
            raise SAEError(f"{source}: a {self.kind} SAE needs tensors {', '.join(shapes)}; "
                           f"missing {', '.join(missing)}")
        sizes = {"d_in": config.d_in, "d_sae": config.d_sae}
        self.tensors: dict[str, torch.Tensor] = {}
        for name, axes in shapes.items():
            t = tensors[name]
            want = [sizes[a] for a in axes]
            if list(t.shape) != want:
                raise SAEError(
                    f"{source}: {name} has shape {list(t.shape)}, expected {want} "
                    f"({' x '.join(axes)} with d_in={config.d_in}, d_sae={config.d_sae})"
                )
            if not t.is_floating_point():
                raise SAEError(f"{source}: {name} is {t.dtype}, expected floating point")
            if not torch.isfinite(t).all():
                raise SAEError(f"{source}: {name} has NaN or infinite values")
            self.tensors[name] = t
            setattr(self, name, t)
        self.check()

    @classmethod
    def shapes(cls) -> Shapes:
        return {**BASE_SHAPES, **cls.extra_shapes}

    def check(self) -> None:
        """Config checks; kinds extend them (raise SAEError naming `self.source`)."""
        if self.config.normalize_activations not in NORMALISATIONS:
            raise SAEError(f"{self.source}: normalize_activations {self.config.normalize_activations!r} is not one "
                           f"of {', '.join(NORMALISATIONS)}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.hook_point}, d_in={self.d_in}, d_sae={self.d_sae}, source={self.source!r})"

    @property
    def d_in(self) -> int:
        return self.config.d_in

    @property
    def d_sae(self) -> int:
        return self.config.d_sae

    @property
    def hook_point(self) -> HookPoint:
        return self.config.hook_point

    @property
    def apply_b_dec_to_input(self) -> bool:
        return self.config.apply_b_dec_to_input

    def key(self) -> tuple:
        """Identity of the weights: SAE objects with the same key share one encoder pass in the scorer."""
        return type(self), self.config, tuple((t.device, t.dtype, t.data_ptr()) for t in self.tensors.values())

    def to(self, device=None, dtype: torch.dtype | None = None) -> SAE:
        """A copy on `device` in `dtype`; the original is left alone (heads may share it)."""
        moved = {k: t.to(device=device, dtype=dtype) for k, t in self.tensors.items()}
        return type(self)(self.config, moved, source=self.source, id=self.id)

    def restrict(self, idx) -> SAE:
        """The SAE cut down to latents `idx` (in that order), for kinds whose latents are independent."""
        if not self.per_latent:
            raise SAEError(f"{self.source}: a {self.kind} SAE ranks all its latents against each other, "
                           "so it cannot be cut down to some of them")
        idx = torch.as_tensor(idx, dtype=torch.long, device=self.W_enc.device)
        cut = {}
        for name, axes in self.shapes().items():
            t = self.tensors[name]
            for dim, axis in enumerate(axes):
                if axis == "d_sae":
                    t = t.index_select(dim, idx)
            cut[name] = t
        return type(self)(dataclasses.replace(self.config, d_sae=len(idx)), cut, source=self.source, id=self.id)

    def input_scale(self, x: torch.Tensor) -> torch.Tensor | None:
        """Per token [..., 1], what run-time normalisation divides x by (None without it): a decoder
        difference times this is the same difference in x's space (how latent clamping writes)."""
        norm = self.config.normalize_activations
        if norm == "constant_norm_rescale":
            return x.norm(dim=-1, keepdim=True) / self.d_in**0.5
        if norm == "layer_norm":
            return x.std(dim=-1, keepdim=True) + LAYER_NORM_EPS
        return None

    def sae_in(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's input: x in the SAE's dtype, normalised per token, minus b_dec where the format does so."""
        x = x.to(self.W_enc.dtype)
        scale = self.input_scale(x)
        if self.config.normalize_activations == "layer_norm":
            x = x - x.mean(dim=-1, keepdim=True)
        if scale is not None:
            x = x / scale
        return x - self.b_dec if self.config.apply_b_dec_to_input else x

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """[..., d_in] -> [..., d_sae] before the activation."""
        return self.sae_in(x) @ self.W_enc + self.b_enc

    @abstractmethod
    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        """Pre-activations [..., d_sae] -> latent activations [..., d_sae]."""

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """[..., d_in] -> dense latent activations [..., d_sae]."""
        return self.activation(self.pre_activations(x))

    def encode_latents(self, x: torch.Tensor, idx) -> torch.Tensor:
        """Activations of latents `idx` only, [..., len(idx)]; equals `encode(x)[..., idx]`.

        Per-latent kinds compute just those encoder columns; the scorer restricts once instead.
        """
        return self.restrict(idx).encode(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents [..., d_sae] -> reconstruction [..., d_in], in the SAE's input space (after any
        run-time normalisation, which depends on the token being encoded)."""
        return z.to(self.W_dec.dtype) @ self.W_dec + self.b_dec
