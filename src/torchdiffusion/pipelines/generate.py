"""Per-seed generation: noise from one generator per seed, so each seed's image is the same at any batch size
(RELIABILITY 27), image grids for looking at the results, and `sample_run`, what the `sample` command does.

Shapes: images are uint8 (N, C, H, W); a grid is uint8 (C, H', W').
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor

from ..data.convert import to_uint8
from ..errors import ConfigError
from ..protocols import Cond, Denoiser
from ..sampling.noise import randn


def seed_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def denoiser_calls(sampler: Callable, sigmas: Tensor, shape: tuple[int, ...] = (1, 1, 1)) -> int:
    """How many times `sampler` calls its denoiser on `sigmas` (counted on one zero image with a denoiser that
    returns zeros; a sampler that needs more of the denoiser than a plain call counts 2 per step)."""
    calls = [0]

    def counting(x: Tensor, sigma: Tensor, cond: Cond = None) -> Tensor:
        calls[0] += 1
        return torch.zeros_like(x)

    try:
        sampler(counting, torch.zeros((1, *shape)), sigmas, cond=None, generator=seed_generators([0]))
    except Exception:  # e.g. a learned-variance sampler (denoise.with_variance): the 2nd-order upper bound
        return 2 * (len(sigmas) - 1)
    return calls[0]


@torch.no_grad()
def generate(denoiser: Denoiser, seeds: Sequence[int], shape: tuple[int, ...], sampler: Callable, sigmas: Tensor, *,
             batch: int = 16, cond_for: Callable[[Sequence[int]], Cond] | None = None,
             device: torch.device = torch.device("cpu"),
             on_batch: Callable[[Sequence[int], Tensor], None] | None = None,
             decode: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Sample one image per seed; returns uint8 (N, C, *S). `shape` is the diffusion-space shape (no batch
    dimension); `decode` maps samples to images in [-1, 1] (the run's codec; None: pixel space).

    The initial noise and every later noise draw of row b come from torch.Generator().manual_seed(seeds[b]) (CPU),
    so the result of a seed does not depend on `batch` or on which process draws it."""
    out = []
    for start in range(0, len(seeds), batch):
        chunk = list(seeds[start:start + batch])
        gens = seed_generators(chunk)
        noise = randn((len(chunk), *shape), gens).to(device)
        cond = cond_for(chunk) if cond_for is not None else None
        x = sampler(denoiser, noise, sigmas, cond=cond, generator=gens)
        if decode is not None:
            x = decode(x)
        images = to_uint8(x.cpu())
        if on_batch is not None:
            on_batch(chunk, images)
        out.append(images)
    return torch.cat(out) if out else torch.empty((0, *shape), dtype=torch.uint8)


def codec_decoder(codec) -> Callable[[Tensor], Tensor] | None:
    """generate()'s decode for a codec: None for pixel space (the identity codec), else codec.decode."""
    from ..autoencoders.identity import IdentityCodec
    return None if codec is None or isinstance(codec, IdentityCodec) else codec.decode


def make_grid(images: Tensor, nrow: int | None = None, padding: int = 2) -> Tensor:
    """uint8 (N, C, H, W) -> uint8 (C, rows*(H+p)+p, nrow*(W+p)+p) with a black border of `padding` pixels."""
    n, c, h, w = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    grid = torch.zeros((c, rows * (h + padding) + padding, nrow * (w + padding) + padding), dtype=torch.uint8)
    for i in range(n):
        r, k = divmod(i, nrow)
        y, x = padding + r * (h + padding), padding + k * (w + padding)
        grid[:, y:y + h, x:x + w] = images[i]
    return grid


def save_png(image: Tensor, path: Path) -> None:
    """uint8 (C, H, W) with C in {1, 3} -> PNG, written atomically (temp file + rename)."""
    from .images import to_pil
    pil = to_pil(image)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    pil.save(tmp, format="PNG")
    tmp.replace(path)


def save_images(images, path, seeds=None) -> list[Path]:
    """uint8 (N, C, H, W) (or (C, H, W), or PIL images) -> PNGs. A path ending in an image suffix is one file (a
    grid when N > 1); anything else is a folder (created) of <seed>.png files, 000000.png ... (seeds default
    0..N-1), as `sample` names them. Returns the paths written."""
    from .images import IMAGE_EXT, from_pil
    if not isinstance(images, torch.Tensor):
        images = list(images)
        channels = 1 if images and getattr(images[0], "mode", "") == "L" else 3
        images = from_pil(images, channels)
    if images.dtype != torch.uint8:
        raise ConfigError(f"save() takes uint8 images (0..255), got {images.dtype}")
    if images.dim() == 3:
        images = images[None]
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ConfigError(f"save() takes (N, C, H, W) images with C = 1 or 3, got {tuple(images.shape)}")
    path = Path(path)
    if path.suffix.lower() in IMAGE_EXT:
        if path.suffix.lower() != ".png":
            raise ConfigError(f"{path}: save() writes PNG files; name it .png or give a folder")
        path.parent.mkdir(parents=True, exist_ok=True)
        save_png(images[0] if len(images) == 1 else make_grid(images), path)
        return [path]
    seeds = list(range(len(images))) if seeds is None else list(seeds)
    if len(seeds) != len(images):
        raise ConfigError(f"{len(seeds)} seeds for {len(images)} images; give one per image")
    path.mkdir(parents=True, exist_ok=True)
    out = []
    for s, im in zip(seeds, images):
        out.append(path / f"{int(s):06d}.png")
        save_png(im, out[-1])
    return out


def _is_sample_output(name: str) -> bool:
    """What `sample` writes into its --outdir: NNNNNN.png (clips: .gif) per seed, grid.png (clips: grid.gif and
    frames.png) and samples.json."""
    return name in ("grid.png", "grid.gif", "frames.png", "samples.json") or (
        name.endswith((".png", ".gif")) and name[:-4].isdigit())


def prepare_outdir(outdir: Path, overwrite: bool = False) -> None:
    """Make sure `sample` never mixes old images with new ones in OUTDIR (samples.json describes only the new).

    An absent or empty folder is used as is. A non-empty one is refused in one line unless `overwrite`: then the
    files an earlier `sample` wrote there (NNNNNN.png, grid.png, samples.json) are removed, and only those; any
    other file makes it a refusal still. Raises errors.OutputError (exit code 1)."""
    from ..errors import OutputError
    outdir = Path(outdir)
    if outdir.exists() and not outdir.is_dir():
        raise OutputError(f"--outdir {outdir} is a file; give a folder")
    entries = sorted(outdir.iterdir()) if outdir.is_dir() else []
    if not entries:
        return
    ours = [p for p in entries if p.is_file() and _is_sample_output(p.name)]
    others = [p for p in entries if p not in ours]
    if not overwrite:
        raise OutputError(f"--outdir {outdir} is not empty ({len(entries)} entries, e.g. {entries[0].name}); give an "
                          f"empty or new folder, or --overwrite to replace the samples written there before")
    if others:
        raise OutputError(f"--outdir {outdir} holds files `sample` did not write (e.g. {others[0].name}); "
                          f"--overwrite removes only earlier samples, so give an empty or new folder")
    for p in ours:
        p.unlink()


def sample_run(run, guided, seed_list: Sequence[int], outdir: Path, *, sample_config, sampler: Callable,
               sampler_options: dict, sigmas: Tensor, nfe: int | None, seeds_text: str, batch: int = 16,
               rank: int = 0, world_size: int = 1, device: torch.device = torch.device("cpu"), counter=None,
               progress: Callable[[int, int], None] | None = None, extra: dict | None = None,
               shape: tuple[int, ...] | None = None) -> dict:
    """Generate this process's share of `seed_list` (every world_size-th seed from rank) with `guided`
    (pipelines.guided.GuidedSampling) into OUTDIR/<seed>.png; the main process also writes grid.png (one process
    only) and samples.json. Returns the samples.json record.

    run: a config.loaders.LoadedRun; nfe: per image, or None for adaptive samplers: then `counter` is the base
    denoiser of `guided`, counting the rows it evaluates (config.sampler_options.CountingDenoiser), and the
    record gives the measured mean. progress(done, total): after each batch written (pipelines.progress.Progress).
    extra: more entries for samples.json (e.g. the autoguidance guide and scale).
    shape: the diffusion-space shape to sample (default the run's; a video run's frame count is free). Clips are
    written as OUTDIR/<seed>.gif, with grid.gif (the clips tiled) and frames.png (a clip per row)."""
    my_seeds = list(seed_list[rank::world_size])
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)

    written = [0]

    def write(chunk, images):
        for s, img in zip(chunk, images):
            if img.ndim == 4:  # a clip (C, T, H, W): an animated GIF per seed (pipelines.video)
                from .clips import save_gif
                save_gif(img.transpose(0, 1), outdir / f"{s:06d}.gif")
            else:
                save_png(img, outdir / f"{s:06d}.png")
        written[0] += len(chunk)
        if progress is not None:
            progress(written[0], len(my_seeds))

    t0 = time.perf_counter()
    images = guided.generate(generate, my_seeds, shape or run.sample_shape, sampler, sigmas, batch=batch, device=device,
                             on_batch=write, decode=codec_decoder(run.codec))
    seconds = time.perf_counter() - t0
    if nfe is None:
        nfe = round(counter.rows / max(len(my_seeds), 1), 2)  # mean per image (this process's seeds)
    scfg = sample_config
    record = {"checkpoint": str(run.path), "step": run.step, "weights": run.weights,
              "checkpoint_sha256": run.hashes(),
              "sampler": scfg.sampler, "steps": scfg.steps, "nfe": nfe, "sampler_options": sampler_options,
              "grid": scfg.grid, "rho": scfg.rho, "spacing": scfg.spacing, "eta": scfg.eta,
              "sigmas": [float(s) for s in sigmas], "seeds": seeds_text, "count": len(seed_list), "batch": batch,
              "processes": world_size, "seconds": round(seconds, 3), "torch": torch.__version__,
              **guided.record(), **(extra or {})}
    if rank == 0:
        if world_size == 1 and images.ndim == 5:
            from .clips import frame_grid, save_gif, tile_clips
            save_gif(tile_clips(images[:64]), outdir / "grid.gif")
            save_png(frame_grid(images[:64]), outdir / "frames.png")
        elif world_size == 1:
            save_png(make_grid(images[:256]), outdir / "grid.png")
        (outdir / "samples.json").write_text(json.dumps(record, indent=2))
    return record
