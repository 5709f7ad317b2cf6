"""Source models for the export: the real iCD SD1.5 release, a tiny model, a full-size random one.

Every builder returns :class:`SourceModels` with the fused forward and reverse UNets. The tiny
and random models run the same code path as the real one: their LoRAs are written to
``.safetensors`` files in the official peft layout and read back through :mod:`lora`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from icd_edge.errors import ExportError
from icd_edge.export import lora as lora_mod
from icd_edge.export import paging
from icd_edge.schedule import (
    FORWARD_POINTS,
    REVERSE_POINTS,
    SDXL_FORWARD_POINTS,
    SDXL_REVERSE_POINTS,
    StepConfig,
    step_config,
    step_config_from_lora_names,
)

logger = logging.getLogger(__name__)

ICD_SD15 = {
    "base": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "teacher": "dbaranchuk/sd15-cfg-distill-unet",
    "lora_repo": "dbaranchuk/icd-lora-sd15",
    "forward_files": {4: "forward-19-259-519-779.safetensors", 3: "forward-19-339-699.safetensors"},
    "reverse_files": {4: "reverse-259-519-779-999.safetensors", 3: "reverse-339-699-999.safetensors"},
}

# diffusers module-name suffixes the iCD LoRAs adapt: 278 modules in SD1.5.
LORA_TARGETS = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
    "time_emb_proj",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
)


ICD_SDXL = {
    "base": "stabilityai/stable-diffusion-xl-base-1.0",
    "teacher": "dbaranchuk/sdxl-cfg-distill-unet",
    "lora_repo": "dbaranchuk/icd-lora-sdxl",
    "forward_files": {4: "forward-19-249-499-699.safetensors", 3: "forward-19-339-699.safetensors"},
    "reverse_files": {4: "reverse-249-499-699-999.safetensors", 3: "reverse-339-699-999.safetensors"},
}

# SDXL's added condition: (original size, crop top-left, target size) of a 1024² square photo
SDXL_TIME_IDS = (1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0)


@dataclass
class SourceModels:
    """What an export needs, already fused. ``sources`` goes into the manifest.

    SDXL (``family="sdxl"``) adds its second text encoder (with the pooled projection) and that
    encoder's tokenizer."""

    name: str
    tokenizer_json: Path
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet_forward: torch.nn.Module
    unet_reverse: torch.nn.Module
    steps: StepConfig
    image_hw: int
    sources: dict = field(default_factory=dict)
    family: str = "sd15"
    text_encoder_2: torch.nn.Module | None = None
    tokenizer_2_json: Path | None = None
    tokenizer_2_pad: str | None = None


# ----------------------------------------------------------------------------- tokenizers


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte → printable-unicode table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def write_clip_tokenizer(vocab: list[str], merges: list[str], out_dir: Path, pad_token: str | None = None) -> Path:
    """Build a CLIP tokenizer with transformers from vocab/merges and save ``tokenizer.json``
    (``pad_token``: another pad than the end token, as SDXL's second tokenizer has)."""
    from transformers import CLIPTokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    from icd_edge.atomic import scratch_dir

    with scratch_dir("tokenizer") as tmp:
        vocab_path, merges_path = Path(tmp, "vocab.json"), Path(tmp, "merges.txt")
        vocab_path.write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
        merges_path.write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges), encoding="utf-8")
        # transformers 5: pass the files positionally (vocab_file=/merges_file= are ignored).
        extra = {"pad_token": pad_token} if pad_token is not None else {}
        tok = CLIPTokenizer(str(vocab_path), str(merges_path), model_max_length=77, **extra)
    path = out_dir / "tokenizer.json"
    tok.backend_tokenizer.save(str(path))
    return path


def byte_level_vocab() -> list[str]:
    """The 514-entry CLIP vocabulary with no merges: 256 bytes, 256 word-final bytes, BOS, EOS."""
    b2u = list(_bytes_to_unicode().values())
    return b2u + [c + "</w>" for c in b2u] + ["<|startoftext|>", "<|endoftext|>"]


def clip_vocab_from_bpe(bpe_lines: list[str]) -> tuple[list[str], list[str]]:
    """CLIP's vocab and merges from the lines of ``bpe_simple_vocab_16e6.txt`` (49408 entries)."""
    merges = [m for m in bpe_lines[1 : 49152 - 256 - 2 + 1]]
    b2u = list(_bytes_to_unicode().values())
    vocab = (
        b2u + [v + "</w>" for v in b2u] + ["".join(m.split()) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    )
    return vocab, merges


# ----------------------------------------------------------------------------- random LoRAs


def lora_target_names(unet) -> list[str]:
    return [
        n
        for n, m in unet.named_modules()
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and any(n.endswith(s) for s in LORA_TARGETS)
    ]


def write_random_lora(unet, path: Path, rank: int, seed: int, std: float) -> Path:
    """A LoRA with random A and B in the official peft layout (no alpha tensors)."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    modules = dict(unet.named_modules())
    tensors = {}
    for name in lora_target_names(unet):
        w = modules[name].weight
        down_shape = (rank, w.shape[1]) if w.ndim == 2 else (rank, w.shape[1], w.shape[2], w.shape[3])
        up_shape = (w.shape[0], rank) if w.ndim == 2 else (w.shape[0], rank, 1, 1)
        fan_in = float(torch.tensor(down_shape[1:]).prod())
        tensors[f"unet.base_model.model.{name}.lora_A.weight"] = torch.randn(down_shape, generator=gen) / fan_in**0.5
        tensors[f"unet.base_model.model.{name}.lora_B.weight"] = torch.randn(up_shape, generator=gen) * std
    save_file(tensors, str(path))
    return path


# ----------------------------------------------------------------------------- builders


def tiny_configs() -> dict:
    """Configs of the tiny model: SD1.5's classes and block structure at toy width."""
    return {
        "unet": dict(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 32, 64, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=32,
            attention_head_dim=2,
            norm_num_groups=8,
            time_cond_proj_dim=512,
        ),
        "vae": dict(
            in_channels=3,
            out_channels=3,
            block_out_channels=(16, 16, 32, 32),
            layers_per_block=1,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=128,
            scaling_factor=0.18215,
        ),
        "text": dict(
            vocab_size=514,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=512,
            eos_token_id=513,
            pad_token_id=513,
        ),
    }


def sd15_configs() -> dict:
    """Full SD1.5 architecture (runwayml config) with the iCD teacher's 512-d guidance input."""
    return {
        "unet": dict(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768,
            attention_head_dim=8,
            norm_num_groups=32,
            time_cond_proj_dim=512,
        ),
        "vae": dict(
            in_channels=3,
            out_channels=3,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            norm_num_groups=32,
            sample_size=512,
            scaling_factor=0.18215,
        ),
        "text": dict(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        ),
    }


def tiny_xl_configs() -> dict:
    """Configs of ``tiny-xl``: SDXL's classes and block structure (three levels, linear
    projections, several transformer layers per block, the ``text_time`` added condition and the
    512-d guidance input of the iCD teacher; two text encoders, the second with a projection) at
    toy width. Text widths 32 + 64 → D = 96, pooled 64."""
    return {
        "unet": dict(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 1, 2),
            attention_head_dim=(2, 4, 4),
            cross_attention_dim=96,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=64 + 6 * 8,
            norm_num_groups=8,
            time_cond_proj_dim=512,
        ),
        "vae": dict(
            in_channels=3,
            out_channels=3,
            block_out_channels=(16, 16, 32, 32),
            layers_per_block=1,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=128,
            scaling_factor=0.13025,
            force_upcast=True,
        ),
        "text": dict(
            vocab_size=514,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=512,
            eos_token_id=513,
            pad_token_id=513,
        ),
        "text_2": dict(
            vocab_size=514,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=64,
            hidden_act="gelu",
            bos_token_id=512,
            eos_token_id=513,
            pad_token_id=0,  # "!" as SDXL's second tokenizer pads
        ),
    }


def sdxl_configs() -> dict:
    """Full SDXL-base architecture (its published config) with the teacher's 512-d guidance input."""
    return {
        "unet": dict(
            sample_size=128,
            in_channels=4,
            out_channels=4,
            block_out_channels=(320, 640, 1280),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
            norm_num_groups=32,
            time_cond_proj_dim=512,
        ),
        "vae": {**sd15_configs()["vae"], "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
        "text": {**sd15_configs()["text"]},
        "text_2": dict(
            vocab_size=49408,
            hidden_size=1280,
            intermediate_size=5120,
            num_hidden_layers=32,
            num_attention_heads=20,
            max_position_embeddings=77,
            projection_dim=1280,
            hidden_act="gelu",
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=0,
        ),
    }


def build_random_xl(
    name: str,
    seed: int,
    work: Path,
    image_hw: int | None = None,
    lora_rank: int | None = None,
    unet_weights: str = "fused",
    lora_rounding: str = "fp16",
    steps: tuple[int, int] = (4, 4),
) -> SourceModels:
    """``tiny-xl`` or ``random-sdxl``: random weights of the SDXL classes, deterministic from
    ``seed``; LoRAs in the official peft layout on SDXL's module names, read by the real loader.
    The 4-step schedule is SDXL's released "4B" (249/499/699)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = tiny_xl_configs() if name == "tiny-xl" else sdxl_configs()
    torch.manual_seed(seed)
    teacher = UNet2DConditionModel(**cfg["unet"]).eval()
    vae = AutoencoderKL(**cfg["vae"]).eval()
    text_encoder = CLIPTextModel(CLIPTextConfig(**cfg["text"])).eval()
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_2"])).eval()
    rank = lora_rank or (4 if name == "tiny-xl" else 64)
    points = (SDXL_FORWARD_POINTS[steps[0]], SDXL_REVERSE_POINTS[steps[1]])
    unet_forward, unet_reverse, step_cfg, lora_facts = _random_pair(
        teacher, work, points, rank, seed, unet_weights, lora_rounding
    )
    tok = write_clip_tokenizer(byte_level_vocab(), [], work / "tokenizer")
    tok_2 = write_clip_tokenizer(byte_level_vocab(), [], work / "tokenizer_2", pad_token="!")
    sources = {
        "kind": "random",
        "seed": seed,
        "note": "random weights of the SDXL classes; LoRAs written in the official peft layout and fused by the "
        "real loader",
        "lora": lora_facts,
    }
    return SourceModels(
        name,
        tok,
        text_encoder,
        vae,
        unet_forward,
        unet_reverse,
        step_cfg,
        image_hw or (128 if name == "tiny-xl" else 1024),
        sources,
        family="sdxl",
        text_encoder_2=text_encoder_2,
        tokenizer_2_json=tok_2,
        tokenizer_2_pad="!",
    )


def _random_pair(teacher, work: Path, points, rank: int, seed: int, unet_weights: str, lora_rounding: str):
    """(forward UNet, reverse UNet, StepConfig, LoRA facts): random LoRAs for the (forward, reverse)
    timestep lists ``points``, written as files named like the released ones and fused by the real loader."""
    fwd_points, rev_points = points
    fwd_file = write_random_lora(teacher, work / _lora_name("forward", fwd_points), rank, seed + 1, std=0.02)
    rev_file = write_random_lora(teacher, work / _lora_name("reverse", rev_points), rank, seed + 2, std=0.02)
    unet_forward, unet_reverse, facts = _fuse_pair(teacher, fwd_file, rev_file, unet_weights, lora_rounding, work)
    return unet_forward, unet_reverse, step_config(fwd_points, rev_points), facts


def _lora_name(kind: str, points) -> str:
    return f"{kind}-{'-'.join(str(t) for t in points)}.safetensors"


def build_random(
    name: str,
    seed: int,
    work: Path,
    image_hw: int | None = None,
    lora_rank: int | None = None,
    unet_weights: str = "fused",
    lora_rounding: str = "fp16",
    steps: tuple[int, int] = (4, 4),
) -> SourceModels:
    """``tiny`` or ``random-sd15``: random weights, deterministic from ``seed``, LoRAs via files."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = tiny_configs() if name == "tiny" else sd15_configs()
    torch.manual_seed(seed)
    teacher = UNet2DConditionModel(**cfg["unet"]).eval()
    vae = AutoencoderKL(**cfg["vae"]).eval()
    text_encoder = CLIPTextModel(CLIPTextConfig(**cfg["text"])).eval()
    rank = lora_rank or (4 if name == "tiny" else 64)
    points = (FORWARD_POINTS[steps[0]], REVERSE_POINTS[steps[1]])
    unet_forward, unet_reverse, step_cfg, lora_facts = _random_pair(
        teacher, work, points, rank, seed, unet_weights, lora_rounding
    )
    tok = write_clip_tokenizer(byte_level_vocab(), [], work / "tokenizer")
    sources = {
        "kind": "random",
        "seed": seed,
        "note": "random weights of the SD1.5 classes; LoRAs written in the official peft layout and fused by the "
        "real loader",
        "lora": lora_facts,
    }
    return SourceModels(
        name,
        tok,
        text_encoder,
        vae,
        unet_forward,
        unet_reverse,
        step_cfg,
        image_hw or (128 if name == "tiny" else 512),
        sources,
    )


def _fuse_pair(
    teacher,
    forward_file: Path,
    reverse_file: Path,
    unet_weights: str = "fused",
    rounding: str = "fp16",
    work: Path | None = None,
):
    """(forward UNet, reverse UNet, facts): LoRAs fused into copies of the teacher, or attached as
    low-rank branches over identical teacher weights (``shared-base``).

    With ``work``, the teacher is paged out to a file there first, the reverse UNet maps the same
    file instead of being a deep copy, and each fused UNet is paged out again: the weights are never
    in ordinary memory more than once (a full-size SDXL pair is 2 × 10.3 GB in float32)."""
    load = lora_mod.load_and_fuse if unet_weights == "fused" else lora_mod.load_as_branches
    unet_forward = teacher
    if work is None:
        import copy

        unet_reverse = copy.deepcopy(teacher)
    else:
        paging.page_out(teacher, work / "teacher.pt")
        unet_reverse = paging.twin(teacher)
    facts = {}
    for kind, unet, path in (("forward", unet_forward, forward_file), ("reverse", unet_reverse, reverse_file)):
        facts[kind] = {"file": path.name, "sha256": _sha(path), **load(unet, path, rounding=rounding)}
        if work is not None and unet_weights == "fused":  # fusing wrote into the mapped weights
            paging.mark_dirty(unet)
            paging.page_out(unet, work / f"unet_{kind}.pt")
    if work is not None and unet_weights == "fused":  # neither UNet maps the teacher's file now
        (work / "teacher.pt").unlink()
    return unet_forward.eval(), unet_reverse.eval(), facts


def _sha(path: Path) -> str:
    from icd_edge.bundle.store import sha256_file

    return sha256_file(path)


# ----------------------------------------------------------------------------- the real release


def _hub_error(what: str, ref: str, exc: Exception, flag: str) -> ExportError:
    return ExportError(
        f"cannot get the {what} {ref!r} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
        f"Without network access (or with HF_HUB_OFFLINE=1) pass local files: {flag}"
    )


def _resolve_file(ref: str, repo: str, revision: str | None, what: str, flag: str) -> Path:
    """A local file path, or ``repo/filename`` downloaded through huggingface_hub."""
    p = Path(ref).expanduser()
    if p.is_file():
        return p
    if ref.startswith((".", "/", "~")) or ref.count("/") == 1:
        raise ExportError(f"{what} {ref} does not exist; give a local file or a hub file as owner/repo/filename")
    if ref.count("/") >= 2:  # owner/repo/filename on the hub
        owner, name, filename = ref.split("/", 2)
        repo = f"{owner}/{name}"
    else:  # a file name in the default repo
        filename = ref
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, filename, revision=revision))
    except Exception as exc:  # huggingface_hub raises many types (offline, 404, connection)
        raise _hub_error(what, f"{repo}/{filename}", exc, flag) from exc


def _from_pretrained(cls, ref: str, revision: str | None, what: str, flag: str, **kw):
    try:
        return cls.from_pretrained(ref, revision=revision, **kw)
    except Exception as exc:  # OSError/EnvironmentError/hub errors for missing or unreachable repos
        if Path(ref).exists():
            raise ExportError(f"cannot load the {what} from {ref}: {exc}") from exc
        raise _hub_error(what, ref, exc, flag) from exc


def load_teacher(ref: str, revision: str | None, base: str):
    """The CFG-distilled teacher: a diffusers folder/hub id, or a ``.safetensors``/``.pt`` state dict."""
    from diffusers import UNet2DConditionModel

    p = Path(ref)
    if p.is_file():
        config = dict(
            _from_pretrained(
                UNet2DConditionModel, base, revision, "base UNet config", "--base DIR", subfolder="unet"
            ).config
        )
        config["time_cond_proj_dim"] = 512
        unet = UNet2DConditionModel.from_config(config)
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(p))
        elif p.suffix in (".pt", ".pth", ".bin", ".ckpt"):
            state = torch.load(str(p), map_location="cpu", weights_only=True)  # never unpickle code
            state = state.get("state_dict", state) if isinstance(state, dict) else state
        else:
            raise ExportError(f"teacher file {p} must be .safetensors or .pt (a state dict); extract a .tar.gz first")
        missing, unexpected = unet.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ExportError(
                f"teacher {p} does not fit the base's UNet ({base}) with a 512-d guidance input: "
                f"missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        return unet.eval()
    unet = _from_pretrained(UNet2DConditionModel, ref, revision, "teacher UNet", "--teacher DIR_OR_FILE")
    if unet.config.get("time_cond_proj_dim") is None:
        raise ExportError(
            f"teacher {ref} has no guidance input (time_cond_proj_dim); pass the CFG-distilled iCD teacher"
        )
    return unet.eval()


def _release_loras(release: dict, forward_lora, reverse_lora, revision, steps, fwd_points, rev_points):
    """(forward file, reverse file, StepConfig): the given LoRA files or the release's, downloaded;
    the schedule from their file names where they carry timesteps."""
    fwd_name, rev_name = release["forward_files"][steps[0]], release["reverse_files"][steps[1]]
    fwd_path = _resolve_file(
        forward_lora or fwd_name,
        release["lora_repo"],
        revision if forward_lora else None,
        "forward LoRA",
        "--forward-lora FILE.safetensors",
    )
    rev_path = _resolve_file(
        reverse_lora or rev_name,
        release["lora_repo"],
        revision if reverse_lora else None,
        "reverse LoRA",
        "--reverse-lora FILE.safetensors",
    )
    try:  # the file names are the authority where they carry timesteps
        step_cfg = step_config_from_lora_names(fwd_path.name, rev_path.name) or step_config(
            fwd_points[steps[0]], rev_points[steps[1]]
        )
    except ValueError as exc:
        raise ExportError(
            f"the forward LoRA {fwd_path.name} and reverse LoRA {rev_path.name} do not form one schedule: {exc}"
        ) from None
    return fwd_path, rev_path, step_cfg


def load_icd_sd15(
    base: str | None,
    teacher: str | None,
    forward_lora: str | None,
    reverse_lora: str | None,
    revision: str | None,
    steps: tuple[int, int],
    work: Path,
    image_hw: int | None = None,
    unet_weights: str = "fused",
    lora_rounding: str = "fp16",
) -> SourceModels:
    """The released iCD-SD1.5: base parts, teacher UNet and two LoRAs (hub ids or local paths)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    base = base or ICD_SD15["base"]
    teacher = teacher or ICD_SD15["teacher"]
    fwd_path, rev_path, step_cfg = _release_loras(
        ICD_SD15, forward_lora, reverse_lora, revision, steps, FORWARD_POINTS, REVERSE_POINTS
    )
    tokenizer = _from_pretrained(CLIPTokenizer, base, revision, "tokenizer", "--base DIR", subfolder="tokenizer")
    text_encoder = _from_pretrained(
        CLIPTextModel, base, revision, "text encoder", "--base DIR", subfolder="text_encoder"
    )
    vae = _from_pretrained(AutoencoderKL, base, revision, "VAE", "--base DIR", subfolder="vae")
    unet = load_teacher(teacher, revision, base)
    unet_forward, unet_reverse, facts = _fuse_pair(unet, fwd_path, rev_path, unet_weights, lora_rounding, work)
    tok_dir = work / "tokenizer"
    tok_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.backend_tokenizer.save(str(tok_dir / "tokenizer.json"))
    sources = {"kind": "icd-sd15", "base": base, "teacher": teacher, "revision": revision, "lora": facts}
    return SourceModels(
        "icd-sd15",
        tok_dir / "tokenizer.json",
        text_encoder.eval(),
        vae.eval(),
        unet_forward,
        unet_reverse,
        step_cfg,
        image_hw or 512,
        sources,
    )


def load_icd_sdxl(
    base: str | None,
    teacher: str | None,
    forward_lora: str | None,
    reverse_lora: str | None,
    revision: str | None,
    steps: tuple[int, int],
    work: Path,
    image_hw: int | None = None,
    unet_weights: str = "fused",
    lora_rounding: str = "fp16",
) -> SourceModels:
    """The released iCD-XL: SDXL-base parts (two tokenizers and text encoders, VAE), the teacher
    UNet and two LoRAs (hub ids or local paths)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    base = base or ICD_SDXL["base"]
    teacher = teacher or ICD_SDXL["teacher"]
    fwd_path, rev_path, step_cfg = _release_loras(
        ICD_SDXL, forward_lora, reverse_lora, revision, steps, SDXL_FORWARD_POINTS, SDXL_REVERSE_POINTS
    )
    parts = {}
    for sub, cls in (
        ("tokenizer", CLIPTokenizer),
        ("tokenizer_2", CLIPTokenizer),
        ("text_encoder", CLIPTextModel),
        ("text_encoder_2", CLIPTextModelWithProjection),
        ("vae", AutoencoderKL),
    ):
        parts[sub] = _from_pretrained(cls, base, revision, sub.replace("_", " "), "--base DIR", subfolder=sub)
    unet = load_teacher(teacher, revision, base)
    unet_forward, unet_reverse, facts = _fuse_pair(unet, fwd_path, rev_path, unet_weights, lora_rounding, work)
    tok_files = []
    if _pad_token(parts["tokenizer"]) is not None:
        raise ExportError(f"the base's first tokenizer pads with {parts['tokenizer'].pad_token!r}, not its end token")
    for sub in ("tokenizer", "tokenizer_2"):
        (work / sub).mkdir(parents=True, exist_ok=True)
        parts[sub].backend_tokenizer.save(str(work / sub / "tokenizer.json"))
        tok_files.append(work / sub / "tokenizer.json")
    sources = {"kind": "icd-sdxl", "base": base, "teacher": teacher, "revision": revision, "lora": facts}
    return SourceModels(
        "icd-sdxl",
        tok_files[0],
        parts["text_encoder"].eval(),
        parts["vae"].eval(),
        unet_forward,
        unet_reverse,
        step_cfg,
        image_hw or 1024,
        sources,
        family="sdxl",
        text_encoder_2=parts["text_encoder_2"].eval(),
        tokenizer_2_json=tok_files[1],
        tokenizer_2_pad=_pad_token(parts["tokenizer_2"]),
    )


def _pad_token(tokenizer) -> str | None:
    """A tokenizer's pad token when it is not the end token (the runtime pads with that by default)."""
    pad = tokenizer.pad_token
    return None if pad in (None, tokenizer.eos_token) else str(pad)


def load_vae(ref: str, revision: str | None):
    """An AutoencoderKL from a hub id or a local diffusers folder (``--vae``)."""
    from diffusers import AutoencoderKL

    return _from_pretrained(AutoencoderKL, ref, revision, "VAE", "--vae DIR").eval()
