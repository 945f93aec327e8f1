"""A fully convolutional prior on a large canvas, one overlapping tile at a time, as one denoiser.

``TiledDenoiser(model, (H, W), tile, overlap)`` is ``model`` evaluated on tiles of ``tile`` x
``tile`` pixels (the model's native size) that cover the canvas with ``overlap`` pixels shared
between neighbours, its outputs cross-faded into one (B, C', H, W) prediction:

    eps(x, t) = sum_k w_k * model(crop_k(x), t) / sum_k w_k,

with w_k a separable linear ramp over the ``overlap`` pixels at each tile edge that lies inside
the canvas (1 elsewhere); with stride ``tile - overlap`` neighbouring ramps sum to one.

Why this blend and not another (measured in ``bench/tiles.py``):

* **Per-step blending of one chain (this module).** Every tile reads the *same* chain state
  x_t and the sampler runs once on the whole canvas: the DDNM range/null-space split, the
  measurement's consistency and the noise rows are global, exactly as without tiles; only the
  network is evaluated locally. In an overlap both tiles see the same pixels, so their
  predictions differ only by the context each lacks at its own border, and the ramp gives
  each tile's border pixels weight near 0 there. A disagreement cannot grow into a seam: the
  next step is taken from the single blended x0, re-noised and projected again, so the tiles
  are pulled to one trajectory at every one of the N steps (the idea of MultiDiffusion, Bar-Tal
  et al. 2023, applied to DDNM's eps).
* **Independent tiles, feathered at the end** (each tile its own chain on its own crop of the
  measurement) is the simple alternative: each chain draws its own sample from the null space
  (texture, colour of missing detail), and the feather only smears two different samples
  across the overlap; the benchmark shows the seam it leaves.
* **DDNM's mask-shift** (each tile conditioned on the already-restored overlap) removes the seam
  too, but it is sequential over tiles; here all tiles of one step are independent.

Every tile of every row is a unit of parallel work: one call of the wrapper batches B rows x T
tiles through the model, ``max_batch`` tiles at a time (the memory bound ``api/budget`` picks);
under torchrun, with the tile given (so every rank tiles alike), the serial sampler's calls are
split over the ranks by tiles (:meth:`shard`: each rank evaluates every P-th tile, one all_reduce), so a large photograph on P GPUs
takes about 1/P of the time; on Ray each worker restores whole photographs, tiled or not.
The model must be fully convolutional with a receptive field well inside a tile (the built-in
prior, the DDPM and ADM UNets); a model with global attention over the whole image changes
meaning under tiling.
"""
from __future__ import annotations

import torch
from torch import nn

from deqir_dist.errors import DeqirError, check_int
from deqir_dist.sampling.denoiser import model_device, unwrap_output


def tile_starts(size: int, tile: int, overlap: int, multiple: int = 1) -> list[int]:
    """Starts of the tiles along one axis of ``size`` pixels: stride ``tile - overlap`` rounded down
    to ``multiple`` (the model's downsampling grid stays aligned in every tile), the last tile
    flush with the end. One tile when ``tile >= size``."""
    if tile >= size:
        return [0]
    stride = max(multiple, (tile - overlap) // multiple * multiple)
    starts = list(range(0, size - tile, stride)) + [size - tile]
    return sorted(set(starts))


def _ramp(length: int, start: int, size: int, overlap: int, dtype) -> torch.Tensor:
    """Weights along one axis of a tile at ``start``: a linear rise over ``overlap`` pixels at an
    edge inside the canvas, 1 at an edge on the canvas border."""
    w = torch.ones(length, dtype=dtype)
    if overlap <= 0:
        return w
    r = (torch.arange(overlap, dtype=dtype) + 0.5) / overlap
    n = min(overlap, length)
    if start > 0:
        w[:n] = torch.minimum(w[:n], r[:n])
    if start + length < size:
        w[length - n:] = torch.minimum(w[length - n:], r[:n].flip(0))
    return w


class TiledDenoiser(nn.Module):
    """``model`` on overlapping tiles of an (H, W) canvas, blended per call (see the module doc)."""

    tileable = False        # a tiled model is not tiled again

    def __init__(self, model, canvas_hw: tuple[int, int], tile: int, overlap: int | None = None,
                 max_batch: int | None = None):
        super().__init__()
        if not callable(model):
            raise DeqirError("the tiled denoiser needs a callable model(x, t)")
        self.model = model
        self.size_multiple = check_int("size_multiple", getattr(model, "size_multiple", 1), 1)
        self.in_channels = getattr(model, "in_channels", None)
        H, W = (int(v) for v in canvas_hw)
        tile = check_int("tile", tile, 8)
        if tile % self.size_multiple:
            raise DeqirError(f"tile {tile} must be a multiple of the model's size multiple {self.size_multiple}")
        overlap = tile // 4 if overlap is None else check_int("overlap", overlap, 0)
        if overlap >= tile:
            raise DeqirError(f"overlap {overlap} must be smaller than the tile {tile}")
        self.canvas, self.tile, self.overlap = (H, W), tile, overlap
        self.max_batch = None if max_batch is None else check_int("max_batch", max_batch, 1)
        m = self.size_multiple
        self.th, self.tw = min(tile, H), min(tile, W)
        self.boxes = [(i, j) for i in tile_starts(H, self.th, overlap, m) for j in tile_starts(W, self.tw, overlap, m)]
        wy = {i: _ramp(self.th, i, H, overlap, torch.float32) for i, _ in self.boxes}
        wx = {j: _ramp(self.tw, j, W, overlap, torch.float32) for _, j in self.boxes}
        weights = torch.stack([wy[i][:, None] * wx[j][None, :] for i, j in self.boxes])      # (T, th, tw)
        total = torch.zeros(H, W)
        for (i, j), w in zip(self.boxes, weights):
            total[i:i + self.th, j:j + self.tw] += w
        # the tiling itself (in the state, so a cached cost profile of another tiling is not read)
        dev = model_device(model, default=torch.device("cpu"))
        self.register_buffer("weights", weights.to(dev), persistent=True)
        self.register_buffer("norm", (1.0 / total).to(dev), persistent=True)
        self.register_buffer("layout", torch.tensor([H, W, tile, overlap], dtype=torch.int64), persistent=True)
        self.group, self.rank, self.world = None, 0, 1

    def shard(self, group=None) -> "TiledDenoiser":
        """Split every call's (row, tile) jobs over the ranks of a torch.distributed ``group`` (every
        rank calls with the same x and t, as the serial sampler does on each rank): rank r evaluates
        jobs r, r + P, ..., and one all_reduce sums the weighted predictions. Returns self."""
        import torch.distributed as dist
        self.group = group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        return self

    @property
    def tiles(self) -> int:
        return len(self.boxes)

    def extra_repr(self) -> str:
        return f"canvas={self.canvas}, tile={self.tile}, overlap={self.overlap}, tiles={self.tiles}"

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        if (H, W) != self.canvas:
            raise DeqirError(f"the tiled denoiser was built for a {self.canvas[0]}x{self.canvas[1]} canvas, "
                             f"got {H}x{W}")
        t = t.reshape(-1).expand(B) if t.numel() in (1, B) else t
        jobs = [(b, k) for b in range(B) for k in range(self.tiles)]     # (row, tile): the units of work
        jobs = jobs[self.rank::self.world]                               # sharded: this rank's share
        step = self.max_batch or max(1, len(jobs))
        out = None
        for lo in range(0, len(jobs), step):
            chunk = jobs[lo:lo + step]
            xs = torch.stack([x[b, :, i:i + self.th, j:j + self.tw] for b, k in chunk
                              for i, j in (self.boxes[k],)])
            ts = torch.stack([t[b] for b, _ in chunk])
            eps = unwrap_output(self.model(xs, ts))
            if not isinstance(eps, torch.Tensor) or eps.dim() != 4 or eps.shape[-2:] != xs.shape[-2:]:
                return eps          # EpsFn reports the shape it got
            if out is None:         # accumulated in float32 at least (a half-precision model's eps too)
                acc = torch.promote_types(eps.dtype, torch.float32)
                out = torch.zeros((B, eps.shape[1], H, W), dtype=acc, device=eps.device)
            w = self.weights if self.weights.device == eps.device else self.weights.to(eps.device)
            for (b, k), e in zip(chunk, eps):
                i, j = self.boxes[k]
                out[b, :, i:i + self.th, j:j + self.tw] += w[k] * e.to(out.dtype)
            del xs, eps
        if self.world > 1:
            import torch.distributed as dist
            if out is None:         # more ranks than jobs: this one adds nothing
                ch = getattr(self.model, "out_channels", None) or C
                out = torch.zeros((B, ch, H, W), dtype=torch.promote_types(x.dtype, torch.float32),
                                  device=x.device)
            dist.all_reduce(out, group=self.group)
        return out * (self.norm if self.norm.device == out.device else self.norm.to(out.device))


def tile_count(canvas_hw: tuple[int, int], tile: int, overlap: int, multiple: int = 1) -> int:
    """How many tiles ``TiledDenoiser`` cuts an (H, W) canvas into."""
    H, W = canvas_hw
    return len(tile_starts(H, min(tile, H), overlap, multiple)) * len(tile_starts(W, min(tile, W), overlap, multiple))


def overlap_factor(canvas_hw: tuple[int, int], tile: int, overlap: int, multiple: int = 1) -> float:
    """Pixels the tiles evaluate per canvas pixel (>= 1): the work tiling adds."""
    H, W = canvas_hw
    n = tile_count(canvas_hw, tile, overlap, multiple)
    return n * min(tile, H) * min(tile, W) / max(1, H * W)

