"""CAST k:n projection (docs/sparsity.md): per output row and group, the kept pattern that
drops the least.

The cost of dropping slots d = 1 − m of group g in row i is rᵀ C_g r with r = d ⊙ w_{i,g}, where
C_g = E[h_g h_gᵀ] is the within-group second moment of the layer's input on the calibration batch
(token rows for a Linear; im2col patch rows per kernel pixel for a Conv2d). Writing A = (w wᵀ) ⊙ C_g,
the cost is vec(A) · vec(d dᵀ), so all (row, group) cells × all patterns are one matrix product.
Magnitude k:n is the same search with C_g = I (keep the k largest |w|).

`cast_fisher` weights every calibration row by what of it reaches the logits: row t's weight is
‖∂CE(z, y)/∂o_t‖², the squared gradient at the layer's output row o_t for a label y sampled from
the model's own softmax (so E_y of it is the Gauss–Newton weight of KL(p_dense ‖ p) on that row),
and C_g = Σ_t w_t h_t h_tᵀ / Σ_t w_t. A ViT patch token the class token never attends to, or a
conv position the pooled features barely see, then counts for little.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import math
from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from mpdeploy.prune.layout import grouped, ungrouped

EXACT_LIMIT = 5000  # C(n, k) at or above this: search a seeded sample (docs/sparsity.md)
SAMPLED_PATTERNS = 1024
CHUNK_FLOATS = 1 << 24  # ~64 MB of float32 per chunk of the cost product


# --- calibration statistics ---------------------------------------------------------------------


class _RowQuota:
    """Spreads at most `max_rows` sampled rows of one layer evenly over the calibration batches."""

    def __init__(self, total_images: int, max_rows: int, seed: int):
        self.total_images = total_images
        self.max_rows = max_rows
        self.generator = torch.Generator().manual_seed(seed)
        self.images_seen = 0
        self.rows_taken = 0

    def choose(self, rows_in_batch: int, images_in_batch: int) -> torch.Tensor:
        self.images_seen += images_in_batch
        rows_per_image = rows_in_batch // images_in_batch
        target = min(self.max_rows, rows_per_image * self.total_images)
        wanted = round(target * self.images_seen / self.total_images) - self.rows_taken
        wanted = max(0, min(wanted, rows_in_batch))
        self.rows_taken += wanted
        return torch.randperm(rows_in_batch, generator=self.generator)[:wanted]


def input_rows(module: nn.Module, x: torch.Tensor, chosen: torch.Tensor | None) -> torch.Tensor:
    """The rows a layer multiplies its weight with: (rows, pixels, Cin); all rows if not `chosen`.

    A Linear's rows are its tokens (pixels = 1). A Conv2d's rows are its output positions, each an
    im2col patch split per kernel pixel, so column c of pixel p meets weight[:, c, p].
    """
    if isinstance(module, nn.Linear):
        rows = x.reshape(-1, x.shape[-1])
        rows = rows if chosen is None else rows[chosen]
        return rows.unsqueeze(1)
    return _patch_rows(module, x, chosen)


def conv_positions(conv: nn.Conv2d, x: torch.Tensor) -> int:
    """Output positions of `conv` over the whole batch `x`."""
    h, w = x.shape[-2:]
    pad = conv._reversed_padding_repeated_twice  # (left, right, top, bottom), also for "same"
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    hout = (h + pad[2] + pad[3] - dh * (kh - 1) - 1) // sh + 1
    wout = (w + pad[0] + pad[1] - dw * (kw - 1) - 1) // sw + 1
    return x.shape[0] * hout * wout


def batch_rows(module: nn.Module, x: torch.Tensor) -> int:
    """The rows `module` multiplies its weight with over the batch `x` (tokens or positions);
    image i owns rows [i·r, (i + 1)·r) of them, r = batch_rows / len(x)."""
    return conv_positions(module, x) if isinstance(module, nn.Conv2d) else x.numel() // x.shape[-1]


def sample_rows(
    module: nn.Module, x: torch.Tensor, quota: _RowQuota, *, ordered: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows `quota` draws from this batch's input `x` of `module`: (indices, float64 rows);
    `ordered`: in the batch's order (image by image), else in the order drawn."""
    chosen = quota.choose(batch_rows(module, x), x.shape[0])
    if ordered:
        chosen = chosen.sort().values
    return chosen, input_rows(module, x, chosen).double()


def _patch_rows(conv: nn.Conv2d, x: torch.Tensor, chosen: torch.Tensor | None) -> torch.Tensor:
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    padded = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    hout = (padded.shape[-2] - dh * (kh - 1) - 1) // sh + 1
    wout = (padded.shape[-1] - dw * (kw - 1) - 1) // sw + 1
    flat = torch.arange(x.shape[0] * hout * wout) if chosen is None else chosen
    b, rest = flat // (hout * wout), flat % (hout * wout)
    oy, ox = rest // wout, rest % wout
    ky = torch.arange(kh).repeat_interleave(kw) * dh  # kernel pixel p = ky·kw + kx
    kx = torch.arange(kw).repeat(kh) * dw
    ys = oy[:, None] * sh + ky[None, :]
    xs = ox[:, None] * sw + kx[None, :]
    return padded.permute(0, 2, 3, 1)[b[:, None], ys, xs]  # (rows, pixels, Cin)


@dataclasses.dataclass
class GroupMoments:
    """Sum of h_g h_gᵀ over sampled rows, per kernel pixel and group: (pixels, G, n, n) float64."""

    total: torch.Tensor
    rows: float = 0  # rows summed (or, for Fisher-weighted moments, the sum of row weights)

    @property
    def mean(self) -> torch.Tensor:
        return self.total / max(self.rows, 1)


def capture_group_moments(
    model: nn.Module,
    layer_names: Iterable[str],
    images: torch.Tensor,
    n: int,
    *,
    max_rows: int = 4096,
    seed: int = 0,
    batch_size: int = 32,
    seed_index: Mapping[str, int] | None = None,
    stop_early: bool = False,
) -> tuple[dict[str, GroupMoments], torch.Tensor | None]:
    """One pass over `images`: the within-group input moments of each named layer, and the logits.

    Layers whose forward never ran (their weight used outside the module) are absent from the dict.
    Layer i's rows are drawn with `seed + i`, i its position in `layer_names` or `seed_index[name]`
    (so a subset of the layers samples the rows it would sample in a pass over all of them).
    `stop_early` ends each batch's forward once every named layer has seen it (a module called
    twice in one forward then counts its first call only), and returns no logits.
    """
    moments: dict[str, GroupMoments] = {}
    names = list(layer_names)
    index = dict(seed_index) if seed_index is not None else {n: i for i, n in enumerate(names)}
    quotas = {name: _RowQuota(images.shape[0], max_rows, seed + index[name]) for name in names}
    pending: set[str] = set()

    def hook(name: str):
        def pre(module, args):
            _, rows = sample_rows(module, args[0].detach(), quotas[name])
            h = rows.reshape(rows.shape[0], rows.shape[1], -1, n)
            record = moments.get(name)
            if record is None:
                shape = (h.shape[1], h.shape[2], n, n)
                record = moments[name] = GroupMoments(torch.zeros(shape, dtype=torch.float64))
            record.total += torch.einsum("rpgi,rpgj->pgij", h, h)
            record.rows += h.shape[0]
            pending.discard(name)
            if stop_early and not pending:
                raise _Done

        return pre

    hooks = {name: hook(name) for name in names}
    if not stop_early:
        return moments, _run_with_hooks(model, images, hooks, batch_size)
    handles = [model.get_submodule(name).register_forward_pre_hook(h) for name, h in hooks.items()]
    try:
        with torch.inference_mode():
            for i in range(0, len(images), batch_size):
                pending.update(names)
                with contextlib.suppress(_Done):
                    model(images[i : i + batch_size])
    finally:
        for handle in handles:
            handle.remove()
    return moments, None


def capture_fisher_moments(
    model: nn.Module,
    layer_names: Iterable[str],
    images: torch.Tensor,
    n: int,
    *,
    max_rows: int = 4096,
    seed: int = 0,
    batch_size: int = 32,
) -> tuple[dict[str, GroupMoments], torch.Tensor]:
    """As `capture_group_moments`, each row weighted by its output-gradient energy (see module doc).

    GroupMoments.rows holds Σ w (so `.mean` is the weighted mean). One forward + backward per batch;
    the images require grad so that no parameter gradient is accumulated.
    """
    names = list(layer_names)
    quotas = {name: _RowQuota(images.shape[0], max_rows, seed + i) for i, name in enumerate(names)}
    moments: dict[str, GroupMoments] = {}
    weight_sums: dict[str, float] = {}
    pending: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    generator = torch.Generator().manual_seed(seed)

    def pre(name: str):
        def hook(module, args):
            pending[name] = sample_rows(module, args[0].detach(), quotas[name])

        return hook

    def post(name: str):
        def hook(module, args, output):
            chosen, rows = pending.pop(name)

            def on_grad(grad, chosen=chosen, rows=rows):
                g = grad.detach()
                g = (
                    g.reshape(-1, g.shape[-1])
                    if g.ndim != 4
                    else g.permute(0, 2, 3, 1).reshape(-1, g.shape[1])
                )
                weight = g[chosen].double().pow(2).sum(1)  # (rows,)
                h = rows.reshape(rows.shape[0], rows.shape[1], -1, n)
                record = moments.get(name)
                if record is None:
                    shape = (h.shape[1], h.shape[2], n, n)
                    record = moments[name] = GroupMoments(torch.zeros(shape, dtype=torch.float64))
                record.total += torch.einsum("r,rpgi,rpgj->pgij", weight, h, h)
                weight_sums[name] = weight_sums.get(name, 0.0) + float(weight.sum())

            if output.requires_grad:
                output.register_hook(on_grad)

        return hook

    handles = []
    for name in names:
        module = model.get_submodule(name)
        handles.append(module.register_forward_pre_hook(pre(name)))
        handles.append(module.register_forward_hook(post(name)))
    logits = []
    try:
        with torch.enable_grad():
            for i in range(0, len(images), batch_size):
                batch = images[i : i + batch_size].clone().requires_grad_(True)
                z = model(batch)
                logits.append(z.detach().float())
                probs = torch.softmax(z.detach().double(), 1)
                labels = torch.multinomial(probs, 1, generator=generator).squeeze(1)
                F.cross_entropy(z, labels, reduction="sum").backward()
    finally:
        for handle in handles:
            handle.remove()
    for name, record in moments.items():
        record.rows = weight_sums[name] if weight_sums[name] > 0 else 1.0
    return moments, torch.cat(logits)


class _Done(Exception):
    """Raised by a capture hook once the layers of interest have seen the batch."""


def capture_channel_energy(
    model: nn.Module, layer_names: Iterable[str], images: torch.Tensor, *, batch_size: int = 32
) -> dict[str, torch.Tensor]:
    """E[h_j²] of every input channel j of each named layer over `images` (float64, (Cin,))."""
    sums: dict[str, list] = {}

    def hook(name: str):
        def pre(module, args):
            x = args[0].detach().double()
            channels = (
                x.reshape(-1, x.shape[-1])
                if isinstance(module, nn.Linear)
                else (x.transpose(0, 1).reshape(x.shape[1], -1).T)
            )
            record = sums.setdefault(name, [torch.zeros(channels.shape[1], dtype=torch.float64), 0])
            record[0] += channels.pow(2).sum(dim=0)
            record[1] += channels.shape[0]

        return pre

    _run_with_hooks(model, images, {name: hook(name) for name in layer_names}, batch_size)
    return {name: total / max(count, 1) for name, (total, count) in sums.items()}


def _run_with_hooks(model, images, hooks, batch_size) -> torch.Tensor:
    handles = [model.get_submodule(name).register_forward_pre_hook(h) for name, h in hooks.items()]
    try:
        with torch.inference_mode():
            outputs = [model(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    finally:
        for handle in handles:
            handle.remove()
    return torch.cat(outputs).float()


# --- the projection ------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def candidate_patterns(k: int, n: int, *, seed: int = 0) -> tuple[torch.Tensor, bool]:
    """Keep patterns (P, n) bool: all C(n, k), or 1024 seeded distinct ones when C(n, k) ≥ 5000.

    Cached: callers must not modify the returned tensor.
    """
    if math.comb(n, k) < EXACT_LIMIT:
        patterns = torch.zeros(math.comb(n, k), n, dtype=torch.bool)
        for row, kept in enumerate(itertools.combinations(range(n), k)):
            patterns[row, list(kept)] = True
        return patterns, False
    generator = torch.Generator().manual_seed(seed)
    keys = torch.rand(4 * SAMPLED_PATTERNS, n, generator=generator)
    chosen = keys.argsort(dim=1)[:, :k]
    patterns = torch.zeros(chosen.shape[0], n, dtype=torch.bool).scatter_(1, chosen, True)
    unique = torch.unique(patterns, dim=0)
    order = torch.randperm(unique.shape[0], generator=generator)[:SAMPLED_PATTERNS]
    return unique[order.sort().values], True


@dataclasses.dataclass(frozen=True)
class Projection:
    mask: torch.Tensor  # bool, the weight's shape
    dropped_energy: float  # Σ rᵀ C_g r over cells, with the calibration C_g
    total_energy: float  # Σ wᵀ C_g w: the layer's output energy when nothing is dropped

    @property
    def dropped_fraction(self) -> float:
        return self.dropped_energy / self.total_energy if self.total_energy > 0 else 0.0


def project(
    weight: torch.Tensor,
    moments: torch.Tensor,
    k: int,
    n: int,
    *,
    method: str = "cast",
    seed: int = 0,
) -> Projection:
    """The k:n mask of `weight` in TensorRT's layout; `moments` (pixels, G, n, n) is the mean C_g.

    method "cast" (and "cast_fisher", whose C_g is Fisher-weighted) minimises rᵀ C_g r per
    (row, group); "magnitude" uses C_g = I. With a sampled
    pattern set the magnitude pattern of each cell is always a candidate too.
    """
    w = grouped(weight.detach().float(), n)  # (out, pixels, G, n)
    data_c = moments.float()
    search_c = torch.eye(n).expand_as(data_c) if method == "magnitude" else data_c
    patterns, sampled = candidate_patterns(k, n, seed=seed)
    dropped = (~patterns).float()
    outer = (dropped[:, :, None] * dropped[:, None, :]).reshape(len(patterns), n * n).T  # (n², P)
    cells_per_row = w.shape[1] * w.shape[2]
    rows_per_chunk = max(1, CHUNK_FLOATS // (cells_per_row * (n * n + len(patterns))))
    keep = torch.empty_like(w, dtype=torch.bool)
    dropped_energy = total_energy = 0.0
    for start in range(0, w.shape[0], rows_per_chunk):
        wc = w[start : start + rows_per_chunk]
        ww = wc[..., :, None] * wc[..., None, :]
        a_search = (ww * search_c).reshape(-1, n * n)
        best_cost, best = (a_search @ outer).min(dim=1)
        chunk_keep = patterns[best]
        if sampled:
            chunk_keep = _prefer_magnitude(wc.reshape(-1, n), a_search, best_cost, chunk_keep, k)
        keep[start : start + rows_per_chunk] = chunk_keep.reshape(wc.shape)
        a_data = (ww * data_c).reshape(-1, n, n)
        d = (~chunk_keep).float()
        dropped_energy += float(torch.einsum("ci,cij,cj->", d, a_data, d))
        total_energy += float(a_data.sum())
    return Projection(ungrouped(keep, tuple(weight.shape)), dropped_energy, total_energy)


def _prefer_magnitude(w_cells, a_cells, best_cost, chosen, k) -> torch.Tensor:
    top = w_cells.abs().topk(k, dim=1).indices
    magnitude = torch.zeros_like(chosen).scatter_(1, top, True)
    d = (~magnitude).float()
    a = a_cells.reshape(-1, d.shape[1], d.shape[1])
    cost = torch.einsum("ci,cij,cj->c", d, a, d)
    return torch.where((cost < best_cost)[:, None], magnitude, chosen)
