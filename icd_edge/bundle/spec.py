"""Graph I/O, declared once as data.

Dims are ints or symbols resolved from the manifest's ``dims``: ``H`` image side, ``h`` latent
side (H/8), ``D`` text-embedding width, ``Q`` query count of the local-blend maps
(``(h/4)²``: 256 at 512 px), ``S`` length of one step's packed source tensors (re-edit graphs,
set by the export from the UNet). The export traces with these shapes, the manifest records them
and every backend validates feeds against them.
"""

from __future__ import annotations

from dataclasses import dataclass

from icd_edge.errors import BundleError, ShapeMismatch

TOKENS = 77
GUIDANCE_DIM = 512
LATENT_CHANNELS = 4


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: ``name``, numpy ``dtype`` name, ``shape`` of ints/symbols."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def resolve(self, dims: dict[str, int]) -> tuple[int, ...]:
        """The concrete shape for a bundle's dims."""
        try:
            return tuple(d if isinstance(d, int) else int(dims[d]) for d in self.shape)
        except KeyError as exc:
            raise ShapeMismatch(f"{self.name}: dim {exc.args[0]!r} is not defined by the bundle") from exc

    def concrete(self, dims: dict[str, int]):
        """The manifest's form of this spec for a bundle's dims."""
        from icd_edge.bundle.schema import IOSpec

        return IOSpec(self.name, self.dtype, self.resolve(dims))


def _unet_io(batch: int) -> tuple[TensorSpec, ...]:
    return (
        TensorSpec("sample", "float32", (batch, LATENT_CHANNELS, "h", "h")),
        TensorSpec("timestep", "float32", (1,)),
        TensorSpec("encoder_hidden_states", "float32", (batch, TOKENS, "D")),
        TensorSpec("timestep_cond", "float32", (batch, GUIDANCE_DIM)),
    )


P2P_CONTROLS = (
    TensorSpec("token_map", "float32", (TOKENS, TOKENS)),
    TensorSpec("refine_alpha", "float32", (TOKENS,)),
    TensorSpec("equalizer", "float32", (TOKENS,)),
    TensorSpec("cross_alpha", "float32", (TOKENS,)),
    TensorSpec("self_flag", "float32", (1,)),
)

# name -> (inputs, outputs)
GRAPHS: dict[str, tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]] = {
    "text_encoder": (
        (TensorSpec("input_ids", "int64", (1, TOKENS)),),
        (TensorSpec("last_hidden_state", "float32", (1, TOKENS, "D")),),
    ),
    "vae_encoder": (
        (TensorSpec("image", "float32", (1, 3, "H", "H")),),
        (TensorSpec("latent_mean", "float32", (1, LATENT_CHANNELS, "h", "h")),),
    ),
    "vae_decoder": (
        (TensorSpec("latent", "float32", (1, LATENT_CHANNELS, "h", "h")),),
        (TensorSpec("image", "float32", (1, 3, "H", "H")),),
    ),
    "unet_forward": (_unet_io(1), (TensorSpec("eps", "float32", (1, LATENT_CHANNELS, "h", "h")),)),
    "unet_reverse": (_unet_io(1), (TensorSpec("eps", "float32", (1, LATENT_CHANNELS, "h", "h")),)),
    # optional (--taesd): fast decoder of UNet-space latents, for previews and cheap final decodes
    "taesd_decoder": (
        (TensorSpec("latent", "float32", (1, LATENT_CHANNELS, "h", "h")),),
        (TensorSpec("image", "float32", (1, 3, "H", "H")),),
    ),
    "unet_reverse_edit": (
        _unet_io(2) + P2P_CONTROLS,
        (
            TensorSpec("eps", "float32", (2, LATENT_CHANNELS, "h", "h")),
            TensorSpec("blend_maps", "float32", (2, "Q", TOKENS)),
        ),
    ),
    # optional (re-edits, see icd_edge.edit.inversion): the edit's source row alone, with the
    # tensors its target row borrows packed into one row, and the target row alone reading them
    "unet_reverse_source": (
        _unet_io(1),
        (
            TensorSpec("eps", "float32", (1, LATENT_CHANNELS, "h", "h")),
            TensorSpec("blend_maps", "float32", (1, "Q", TOKENS)),
            TensorSpec("source_cache", "float32", (1, "S")),
        ),
    ),
    "unet_reverse_target": (
        _unet_io(1)
        + P2P_CONTROLS
        + (TensorSpec("source_text", "float32", (1, TOKENS, "D")), TensorSpec("source_cache", "float32", (1, "S"))),
        (
            TensorSpec("eps", "float32", (1, LATENT_CHANNELS, "h", "h")),
            TensorSpec("blend_maps", "float32", (1, "Q", TOKENS)),
        ),
    ),
}


# SDXL (iCD-XL, family "sdxl"): two text encoders (penultimate hidden states, widths D1 + D2 = D;
# the second's pooled projection of width P), the added condition (pooled text, time_ids) on
# both UNets, batch 1 throughout (editing switches prompts, no Prompt-to-Prompt), and the
# posterior's log-variance, since SDXL encodes a sample of the posterior rather than its mean.
TIME_IDS = 6


def _xl_unet_io() -> tuple[TensorSpec, ...]:
    return _unet_io(1) + (
        TensorSpec("text_embeds", "float32", (1, "P")),
        TensorSpec("time_ids", "float32", (1, TIME_IDS)),
    )


XL_GRAPHS: dict[str, tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]] = {
    "text_encoder": (
        (TensorSpec("input_ids", "int64", (1, TOKENS)),),
        (TensorSpec("hidden_states", "float32", (1, TOKENS, "D1")),),
    ),
    "text_encoder_2": (
        (TensorSpec("input_ids", "int64", (1, TOKENS)),),
        (TensorSpec("hidden_states", "float32", (1, TOKENS, "D2")), TensorSpec("text_embeds", "float32", (1, "P"))),
    ),
    "vae_encoder": (
        (TensorSpec("image", "float32", (1, 3, "H", "H")),),
        (
            TensorSpec("latent_mean", "float32", (1, LATENT_CHANNELS, "h", "h")),
            TensorSpec("latent_logvar", "float32", (1, LATENT_CHANNELS, "h", "h")),
        ),
    ),
    "vae_decoder": GRAPHS["vae_decoder"],
    "unet_forward": (_xl_unet_io(), GRAPHS["unet_forward"][1]),
    "unet_reverse": (_xl_unet_io(), GRAPHS["unet_reverse"][1]),
}


def graph_table(family: str) -> dict[str, tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]]:
    """The graph I/O table of a model family (``sd15`` or ``sdxl``)."""
    if family == "sdxl":
        return XL_GRAPHS
    if family == "sd15":
        return GRAPHS
    raise BundleError(f"unknown model family {family!r}; this icd_edge reads sd15 and sdxl bundles")


REEDIT_GRAPHS = ("unet_reverse_source", "unet_reverse_target")
OPTIONAL_GRAPHS = frozenset({"taesd_decoder", *REEDIT_GRAPHS})


def dims_for(image_hw: int, text_dim: int) -> dict[str, int]:
    """The dim table for a square image side and a text width."""
    if image_hw % 64:
        raise ShapeMismatch(f"image side must be a multiple of 64, got {image_hw}")
    latent = image_hw // 8
    return {"H": image_hw, "h": latent, "D": text_dim, "Q": (latent // 4) ** 2}


def dims_for_xl(image_hw: int, text_dim: int, text_dim_2: int, pooled_dim: int) -> dict[str, int]:
    """The dim table of an SDXL bundle: image sides, the two encoders' widths and their sum, the pooled width."""
    dims = dims_for(image_hw, text_dim + text_dim_2)
    del dims["Q"]  # no local blend
    return dims | {"D1": text_dim, "D2": text_dim_2, "P": pooled_dim}


def check_feeds(graph: str, feeds: dict, specs) -> None:
    """Validate numpy feeds against a graph's manifest specs (names, dtypes, shapes); raise ShapeMismatch."""
    names = {s.name for s in specs}
    extra = set(feeds) - names
    missing = names - set(feeds)
    if extra or missing:
        raise ShapeMismatch(f"{graph}: inputs {sorted(feeds)} do not match the graph's {sorted(names)}")
    for s in specs:
        arr = feeds[s.name]
        if str(arr.dtype) != s.dtype or tuple(arr.shape) != tuple(s.shape):
            raise ShapeMismatch(
                f"{graph}.{s.name}: expected {s.dtype}{tuple(s.shape)}, got {arr.dtype}{tuple(arr.shape)}"
            )


def check_graph_io(graph: str, path, actual: dict, declared) -> None:
    """A graph file's own I/O (``{name: shape}``, symbolic dims as str/None) must be what the
    manifest declares, e.g. the same resolution; raise BundleError otherwise."""
    got = {name: [d if isinstance(d, int) else None for d in shape] for name, shape in actual.items()}
    for spec in declared:
        shape = got.get(spec.name)
        if shape is None:
            raise BundleError(
                f"{path.name} has no tensor {spec.name!r} that the manifest declares for {graph}; re-export the bundle"
            )
        if any(g is not None and g != d for g, d in zip(shape, spec.shape)) or len(shape) != len(spec.shape):
            raise BundleError(
                f"{graph}: the graph {path.name} takes {spec.name} of shape {shape} but the manifest declares "
                f"{list(spec.shape)} (a bundle built for another resolution?); re-export the bundle"
            )
