"""The decoding cache (docs/method.md section 4): what one layer keeps between generated tokens.

Convention shared with attamba.costs: after T tokens a layer holds exactly the keys visible to query T-1.
- attamba: the K/V (after RoPE) of the last min(L+1, T) positions, in a ring of L+1 slots, followed in the
  same tensors by a store of the visible boundaries (chunk ends and the sink) that have left that window
  (the store only grows once the ring is full, so the two never interleave and one attention call reads
  both); plus the K- and V-SSM
  states of the unfinished chunk, stacked K over V (conv windows [2, B, conv_dim, W-1] and scan states
  [2, B, H, head_dim, N], float32), zeroed as soon as a chunk completes.
- attamba with pseudo_chunk, full, iso_kv: every position (and the SSM states for pseudo_chunk).
- swa: the last W positions, in a ring of W slots.
Keys sit in ring order, not position order: RoPE is already applied and softmax does not care about order.

Each sequence of a batch has its own position and its own key tensors (a batch may mix prompt lengths);
the SSM states are batched, one row per sequence. Key tensors are allocated at their exact size unless
`reserve` asks for room, so `nbytes` (the bytes of the storages really held) equals
`costs.kv_cache_bytes` exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import boundaries as bnd
from .config import ModelConfig

_FLAG_BLOCK = 4096


class _BoundaryFlags:
    """Chunk ends and visible boundaries of one layer, by absolute position (eval seed), computed lazily."""

    def __init__(self, cfg: ModelConfig, layer: int):
        self.cfg, self.layer = cfg, layer
        self._ends: list[bool] = []
        self._visible: list[bool] = []

    def _extend(self, position: int):
        cfg = self.cfg
        while len(self._ends) <= position:
            pos = torch.arange(len(self._ends), len(self._ends) + _FLAG_BLOCK)
            ends = bnd.chunk_ends(cfg.boundaries, cfg.chunk_size, self.layer, cfg.n_layers, pos, cfg.boundary_seed)
            self._ends.extend(ends.tolist())
            self._visible.extend(bnd.visible_boundaries(ends, pos).tolist())

    def end(self, position: int) -> bool:
        self._extend(position)
        return self._ends[position]

    def visible(self, position: int) -> bool:
        self._extend(position)
        return self._visible[position]

    def ends_tensor(self, length: int) -> torch.Tensor:
        """bool [length]: chunk ends at positions 0..length-1."""
        self._extend(max(length - 1, 0))
        return torch.tensor(self._ends[:length], dtype=torch.bool)

    def visible_tensor(self, length: int) -> torch.Tensor:
        """bool [length]: visible boundaries at positions 0..length-1."""
        self._extend(max(length - 1, 0))
        return torch.tensor(self._visible[:length], dtype=torch.bool)


class KVBuffer:
    """Keys and values [H, n, D] of one sequence in one layer, in tensors of capacity >= n."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v, self.n = k, v, k.shape[1]

    @classmethod
    def empty(cls, heads: int, head_dim: int, dtype: torch.dtype, device) -> "KVBuffer":
        return cls(torch.empty(heads, 0, head_dim, dtype=dtype, device=device),
                   torch.empty(heads, 0, head_dim, dtype=dtype, device=device))

    @classmethod
    def joined(cls, ks: list[torch.Tensor], vs: list[torch.Tensor]) -> "KVBuffer":
        """Exact-size new tensors holding the parts in order (never a slice of a larger prefill storage)."""
        return cls(torch.cat(ks, dim=1), torch.cat(vs, dim=1))

    def _grow(self, capacity: int):
        heads, _, dim = self.k.shape
        k = self.k.new_empty(heads, capacity, dim)
        v = self.v.new_empty(heads, capacity, dim)
        k[:, : self.n] = self.k[:, : self.n]
        v[:, : self.n] = self.v[:, : self.n]
        self.k, self.v = k, v

    def reserve(self, extra: int):
        if self.n + extra > self.k.shape[1]:
            self._grow(self.n + extra)

    def append(self, k: torch.Tensor, v: torch.Tensor):
        """k, v: [H, m, D]."""
        m = k.shape[1]
        if self.n + m > self.k.shape[1]:
            self._grow(self.n + m)
        self.k[:, self.n : self.n + m] = k
        self.v[:, self.n : self.n + m] = v
        self.n += m

    def write(self, slot: int, k: torch.Tensor, v: torch.Tensor):
        self.k[:, slot : slot + 1] = k
        self.v[:, slot : slot + 1] = v

    def view(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[:, : self.n], self.v[:, : self.n]

    def tensors(self) -> list[torch.Tensor]:
        return [self.k, self.v]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One query per head over every held key. q: [H, 1, D]; k, v: [H, n, D] -> [H, 1, D]."""
    return F.scaled_dot_product_attention(q[None], k[None], v[None])[0]


def window_slots(cfg: ModelConfig) -> int | None:
    """Size of the ring of most recent positions: L+1 (attamba), W (swa), or None (every position kept)."""
    return None if cfg.leading_window is None else cfg.leading_window + 1


class LayerCache:
    """One layer's decoding state for a batch of sequences (see the module docstring)."""

    def __init__(self, cfg: ModelConfig, layer: int, lengths: list[int], keys: list[KVBuffer], ssm_states=None):
        self.cfg, self.layer = cfg, layer
        self.lengths = list(lengths)  # tokens seen per sequence = position of its next token
        self.keys = keys  # per sequence: the ring of `slots` recent positions, then the boundary store
        self.slots = window_slots(cfg)
        self.has_store = has_store(cfg)
        self.flags = _BoundaryFlags(cfg, layer) if cfg.attention == "attamba" else None
        # Given as ((k_conv, k_scan), (v_conv, v_scan)); held stacked, K over V: conv [2, B, conv_dim, W-1]
        # and scan [2, B, H, head_dim, N], float32, one row per sequence (one step updates both SSMs).
        self._ssm = None if ssm_states is None else tuple(torch.stack(pair) for pair in zip(*ssm_states))

    # ---- SSM states -----------------------------------------------------------------------------------

    def ssm_states(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(conv [2, B, conv_dim, W-1], scan [2, B, H, head_dim, N]): the K-SSM's states over the V-SSM's."""
        return self._ssm

    def set_ssm_states(self, conv: torch.Tensor, scan: torch.Tensor):
        """States after the current token; rows whose token ended a chunk are zeroed for the next one."""
        conv, scan = conv.float().contiguous(), scan.float().contiguous()  # exactly the bytes the formula counts
        ends = [self.flags.end(p) for p in self.lengths]
        if any(ends):
            keep = torch.tensor([not e for e in ends], dtype=torch.float32, device=conv.device)
            conv = conv * keep[:, None, None]
            scan = scan * keep[:, None, None, None]
        self._ssm = (conv, scan)

    # ---- keys -----------------------------------------------------------------------------------------

    def append_and_attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v: [B, H, 1, D] of each sequence's current token -> attention output [B, H, 1, D]."""
        outs = []
        for i, position in enumerate(self.lengths):
            keys = self.keys[i]
            if self.slots is None or position < self.slots:
                keys.append(k[i], v[i])
            else:
                slot = position % self.slots
                leaving = position - self.slots
                if self.has_store and self.flags.visible(leaving):
                    keys.append(keys.k[:, slot : slot + 1], keys.v[:, slot : slot + 1])
                keys.write(slot, k[i], v[i])
            outs.append(_attend(q[i], *keys.view()))
            self.lengths[i] = position + 1
        return torch.stack(outs)

    def stored_boundaries(self, i: int) -> int:
        """How many boundaries that left the window sequence i's store holds (0 without a store)."""
        return self.keys[i].n - min(self.lengths[i], self.slots) if self.has_store else 0

    def reserve(self, extra: int):
        """Room for `extra` more tokens per sequence, so decoding appends without reallocating.

        Capacity is exactly what those tokens will use, so nbytes() is exact again once they are decoded.
        """
        for i, length in enumerate(self.lengths):
            if self.slots is None:
                self.keys[i].reserve(extra)
                continue
            needed = min(self.slots, length + extra) - min(self.slots, length)
            if self.has_store:
                leaving = range(max(length - self.slots, 0), max(length + extra - self.slots, 0))
                needed += sum(self.flags.visible(p) for p in leaving)
            self.keys[i].reserve(needed)

    def tensors(self) -> list[torch.Tensor]:
        out = [t for keys in self.keys for t in keys.tensors()]
        if self._ssm is not None:
            out += list(self._ssm)
        return out


class DecodeCache:
    """Per-layer caches of a batch of sequences, each at its own position."""

    def __init__(self, layers: list[LayerCache]):
        self.layers = layers

    def positions(self) -> torch.Tensor:
        """int64 [B]: the position of each sequence's next token."""
        return torch.tensor(self.layers[0].lengths, dtype=torch.int64)

    def nbytes(self) -> int:
        """Bytes of the storages the cache tensors really hold, each storage counted once."""
        seen = {}
        for layer in self.layers:
            for t in layer.tensors():
                storage = t.untyped_storage()
                seen[storage.data_ptr(), storage.nbytes()] = storage.nbytes()
        return sum(seen.values())

    def reserve(self, extra: int):
        for layer in self.layers:
            layer.reserve(extra)


def has_store(cfg: ModelConfig) -> bool:
    """Whether a layer keeps the boundaries that left its window (Attamba with true chunks)."""
    return cfg.attention == "attamba" and not cfg.pseudo_chunk


def check_decodable(cfg: ModelConfig):
    if cfg.attention == "attamba" and cfg.ssm_segmentation != "chunk":
        raise ValueError(f"ssm_segmentation must be 'chunk' to decode step by step, got {cfg.ssm_segmentation!r}: "
                         "the released 'offset' segmentation mixes tokens across chunks, so no per-chunk state "
                         "reproduces it; evaluate it with the parallel forward")


def _prefill_ssm_states(states, flags: _BoundaryFlags, length: int):
    """Final SSM states of a prompt, with what belongs to an already finished chunk zeroed.

    The conv state holds the last W-1 inputs; those at or before the last chunk end are from an earlier
    chunk than the next token's and must not reach it. A prompt ending on a chunk end leaves no scan state.
    """
    ends = flags.ends_tensor(length)
    done = torch.nonzero(ends)
    last_end = int(done[-1]) if done.numel() else -1
    out = []
    for conv, scan in states:
        width = conv.shape[-1]
        columns = torch.arange(length - width, length, device=conv.device)
        conv = conv.float() * (columns > last_end).to(torch.float32)
        scan = scan.float() * (0.0 if bool(ends[-1]) else 1.0)
        out.append((conv.contiguous(), scan.contiguous()))
    return tuple(out)


def _ring_order(length: int, slots: int) -> torch.Tensor:
    """Positions of the last `slots` tokens in ring order: slot s holds the position p with p % slots == s."""
    first = length - slots
    return first + torch.remainder(torch.arange(slots) - first, slots)


def _layer_from_prefill(cfg: ModelConfig, layer: int, kv, length: int):
    """(keys, ssm_states) of one sequence from the prefill's k, v [1, H, T, D] and SSM states."""
    k, v, states = kv
    k, v = k[0], v[0]
    slots = window_slots(cfg)
    flags = _BoundaryFlags(cfg, layer) if cfg.attention == "attamba" else None
    if slots is None or length <= slots:
        ks, vs = [k], [v]
    else:
        index = _ring_order(length, slots).to(k.device)
        ks, vs = [k.index_select(1, index)], [v.index_select(1, index)]
    if has_store(cfg):
        index = torch.nonzero(flags.visible_tensor(max(length - slots, 0)))[:, 0].to(k.device)
        ks.append(k.index_select(1, index))
        vs.append(v.index_select(1, index))
    ssm = _prefill_ssm_states(states, flags, length) if states is not None else None
    return KVBuffer.joined(ks, vs), ssm


def _cat_states(rows):
    """Per-sequence ((k_conv, k_scan), (v_conv, v_scan)) with batch 1 -> one batched tuple."""
    if rows[0] is None:
        return None
    return tuple(tuple(torch.cat([r[j][i] for r in rows]) for i in range(2)) for j in range(2))


def empty_cache(model, batch: int) -> DecodeCache:
    """A cache holding nothing, for decoding from position 0."""
    cfg = model.config
    check_decodable(cfg)
    dtype, device = model.embed.weight.dtype, model.embed.weight.device
    layers = []
    for layer in range(cfg.n_layers):
        keys = [KVBuffer.empty(cfg.n_heads, cfg.attn_head_dim, dtype, device) for _ in range(batch)]
        ssm = None
        if cfg.attention == "attamba":
            shapes = model.layers[layer].attn.ssm_k.state_shapes(batch)
            ssm = tuple(tuple(torch.zeros(s, device=device) for s in shapes) for _ in range(2))
        layers.append(LayerCache(cfg, layer, [0] * batch, keys, ssm))
    return DecodeCache(layers)


@torch.no_grad()
def prefill(model, prompts: list[torch.Tensor]) -> tuple[DecodeCache, list[torch.Tensor]]:
    """Run each prompt (int64 [T_i], T_i >= 1) through the parallel path and build one batched cache.

    Prompts are prefilled one at a time so each keeps its own absolute positions, then their caches are
    joined. Returns the cache and each prompt's logits [T_i, V].
    """
    cfg = model.config
    check_decodable(cfg)
    if not prompts:
        raise ValueError("prompts must hold at least one prompt, got an empty list")
    per_seq, logits = [], []
    for i, prompt in enumerate(prompts):
        if prompt.dim() != 1 or prompt.numel() == 0:
            raise ValueError(f"prompts[{i}] must be a non-empty 1-D token tensor, got shape {list(prompt.shape)}")
        out, kvs = model.prefill(prompt[None])
        logits.append(out[0])
        per_seq.append([_layer_from_prefill(cfg, layer, kv, prompt.numel()) for layer, kv in enumerate(kvs)])
    lengths = [p.numel() for p in prompts]
    layers = []
    for layer in range(cfg.n_layers):
        rows = [seq[layer] for seq in per_seq]
        layers.append(LayerCache(cfg, layer, lengths, [r[0] for r in rows], _cat_states([r[1] for r in rows])))
    return DecodeCache(layers), logits


@torch.no_grad()
def decode_step(model, cache: DecodeCache, tokens: torch.Tensor) -> torch.Tensor:
    """Feed one token per sequence (int64 [B]) at each sequence's next position -> logits [B, V]."""
    return model.step(tokens, cache.positions().to(tokens.device), cache.layers)
