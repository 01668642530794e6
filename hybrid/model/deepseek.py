"""DeepSeek-V2 forward pass: RMSNorm, MLA attention on a latent KV cache, dense MLP and MoE layers.

The model imports no runtime: routed experts are computed by an `ExpertBackend` passed in (see experts.py)."""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from . import fused, fused_moe
from .decode_attention import decode_attends, decode_attention
from .embedding import EMBED, TokenEmbedding
from .latent_cache import LatentCache
from .config import ModelConfig
from .rope import Rope

Weights = Callable[[str], torch.Tensor]     # may carry quantized_ffn (see the function of that name)
ATTN_SCORE_ELEMS = 1 << 23     # scores computed at once (x 4 bytes, x ~3 live copies): bounds prefill workspace


class ExpertBackend(Protocol):
    """Computes the routed experts of one MoE layer: sum_k w[t, k] * expert_{idx[t, k]}(x[t]). An offloading
    backend may also have `guesses` (offload/guesses.py: the layer's output computed before the routing sync,
    which engine/graphs.py launches; unrelated to the prefetch guess of `wants_guess`)."""
    capturable: bool     # True if forward never synchronises with the host (the whole step can be a CUDA graph)
    wants_guess: bool    # True if MoECall.pred (the next MoE layer's experts, guessed early) should be filled in

    def forward(self, call: "MoECall") -> torch.Tensor:
        """call.x [T, Hd] (compute dtype), call.idx [T, K] int64, call.w [T, K] float32 -> [T, Hd] in x's dtype."""
        ...

    def set_threads(self, threads: int) -> None:
        """Use `threads` CPU threads from the next layer on (the engine lowers it while cores are busy)."""
        ...

    def begin(self, stats) -> None:
        """A forward pass (prefill and decode of one request, or one logits call) starts: count into `stats`."""
        ...

    def end(self, stats) -> None:
        """It ended: settle what is pending and add layer timings to `stats`."""
        ...


class RMSNorm:
    """weight * x * rsqrt(mean(x^2) + eps), normalised in fp32 and rounded to x's dtype before the weight."""

    def __init__(self, weight: torch.Tensor, eps: float):
        self.weight, self.eps = weight, eps

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return fused.add_rms_norm(x, None, self.weight, self.eps)[1]

    def add(self, x: torch.Tensor, d: torch.Tensor,
            d2: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual step: -> (x + d, or x + (d + d2), and this norm of it)."""
        return fused.add_rms_norm(x, d, self.weight, self.eps, d2)


def gated_ffn(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """SiLU-gated feed-forward (the dense MLP, shared and routed experts): x [N, Hd], w13 [2I, Hd] (gate rows, then
    up rows), w2 [Hd, I] -> [N, Hd]."""
    g, u = F.linear(x, w13).chunk(2, dim=-1)                                              # [N, I] each
    return F.linear(F.silu(g) * u, w2)


def grouped_ffn(xs: torch.Tensor, offs: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                grouping: tuple | None = None) -> torch.Tensor:
    """gated_ffn for rows of xs grouped by expert (group g ends at offs[g]) through w13 [G, 2I, Hd], w2 [G, Hd, I].
    (`grouping`, the bounds and the groups with rows first, is a hint for the quantized twin.)"""
    gu = torch._grouped_mm(xs, w13.transpose(1, 2), offs=offs)                       # [N, 2I]
    return torch._grouped_mm(fused.silu_mul(gu), w2.transpose(1, 2), offs=offs)      # [N, Hd]


def quantized_linear(w: Weights, name: str):
    """The matrix `name` as a callable x [..., K] -> x W^T that `w` keeps in quantized blocks (w.quantized_linear:
    a GGUF file's, while offloading), or None."""
    get = getattr(w, "quantized_linear", None)
    return get(name) if get is not None else None


def linear(w: Weights, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """x -> x W^T for the matrix `name`: quantized_linear's where there is one, else w's tensor through F.linear."""
    return quantized_linear(w, name) or partial(F.linear, weight=w(name))


def quantized_ffn(w: Weights, layer: int, which: str):
    """The layer's shared experts ("shared") or dense MLP ("dense") as a callable FFN x [N, Hd] -> [N, Hd] that `w`
    keeps in quantized blocks (w.quantized_ffn: a GGUF file's, while offloading), or None: an MLP of w's tensors."""
    get = getattr(w, "quantized_ffn", None)
    return get(layer, which) if get is not None else None


class MLP:
    """SiLU-gated feed-forward with gate and up fused in one matrix [2I, H]."""

    def __init__(self, w: Weights, prefix: str):
        self.w13 = torch.cat([w(f"{prefix}.gate_proj.weight"), w(f"{prefix}.up_proj.weight")])   # [2I, H]
        self.w2 = w(f"{prefix}.down_proj.weight")                                                  # [H, I]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """gated_ffn, with the SiLU product fused on a GPU."""
        return F.linear(fused.silu_mul(F.linear(x, self.w13)), self.w2)


@dataclass
class StepState:
    """Where a forward writes in the cache and what it may attend to."""
    start: int                   # first cache slot written by this forward (eager path)
    positions: torch.Tensor      # [B, T] rope positions
    mask: torch.Tensor           # [B, 1, T, kv_len] additive (0 or -1e30), float32
    rows: torch.Tensor | None    # flat indices of real (non-padding) tokens, None if all are real
    kv_len: int = 0              # cache slots attended to (start + T eagerly; the whole capacity in a graph)
    write_index: torch.Tensor | None = None   # [T] cache slots to write, as a tensor (CUDA-graph decode)


class MLAttention:
    """Multi-head latent attention computed on the latent cache: kv_b_proj is absorbed into q and the output."""

    def __init__(self, cfg: ModelConfig, w: Weights, i: int):
        p = f"model.layers.{i}.self_attn"
        self.cfg, self.i = cfg, i
        H, C = cfg.num_attention_heads, cfg.kv_lora_rank
        q_name = f"{p}.q_proj.weight" if cfg.q_lora_rank is None else f"{p}.q_a_proj.weight"
        kv_name = f"{p}.kv_a_proj_with_mqa.weight"
        if cfg.q_lora_rank is not None:
            self.q_a_norm = RMSNorm(w(f"{p}.q_a_layernorm.weight"), 1e-6)
            self.q_b = w(f"{p}.q_b_proj.weight")
        self.in_proj, self.q_in, self.kv_in = self._inputs(w, q_name, kv_name)
        self.kv_rows = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        self.kv_norm = RMSNorm(w(f"{p}.kv_a_layernorm.weight"), 1e-6)
        kv_b = w(f"{p}.kv_b_proj.weight").view(H, cfg.qk_nope_head_dim + cfg.v_head_dim, C)
        self.w_uk = kv_b[:, :cfg.qk_nope_head_dim].contiguous()                          # [H, Dn, C]
        self.w_uv = kv_b[:, cfg.qk_nope_head_dim:].contiguous()                          # [H, Dv, C]
        self.o_proj = linear(w, f"{p}.o_proj.weight")                                   # [Hd, H*Dv]

    @staticmethod
    def _inputs(w: Weights, q_name: str, kv_name: str):
        """x's two projections (q's, or q's low-rank input; the latent and the key's rope part): in one GEMV
        ([Q + C + R, Hd], -> (it, None, None)), or each as `linear` gives it where a GGUF keeps one in its blocks
        (-> (None, q's, kv's))."""
        q_in, kv_in = quantized_linear(w, q_name), quantized_linear(w, kv_name)
        if q_in is None and kv_in is None:
            return torch.cat([w(q_name), w(kv_name)]), None, None
        return None, q_in or partial(F.linear, weight=w(q_name)), kv_in or partial(F.linear, weight=w(kv_name))

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, Hd] -> (q [B, T, H*(Dn+R)], kv [B, T, C+R]), views of one output where the layout allows."""
        if self.in_proj is None:
            q, kv = self.q_in(x), self.kv_in(x)
        else:
            q, kv = F.linear(x, self.in_proj).split([self.in_proj.shape[0] - self.kv_rows, self.kv_rows], dim=-1)
        if self.cfg.q_lora_rank is not None:
            q = F.linear(self.q_a_norm(q), self.q_b)
        return q, kv

    def __call__(self, x: torch.Tensor, cache: LatentCache, st: StepState, rot: torch.Tensor) -> torch.Tensor:
        cfg, (B, T, _) = self.cfg, x.shape
        H = cfg.num_attention_heads
        q, kv = self._project(x)
        q_nope, q_pe = fused.mla_prep(q.view(B, T, H, cfg.qk_head_dim), kv, rot, self.kv_norm.weight,
                                      self.kv_norm.eps, cache.c[self.i], cache.pe[self.i], st.start,
                                      st.write_index)                                     # [B, T, H, Dn | R]
        kc = cache.c[self.i, :, :st.kv_len]                                              # [B, S, C]
        kpe = cache.pe[self.i, :, :st.kv_len]                                            # [B, S, R]
        q_lat = torch.einsum("bthd,hdc->bhtc", q_nope, self.w_uk)                         # [B, H, T, C]
        q_pe = q_pe.transpose(1, 2)                                                      # [B, H, T, R]
        if decode_attends(q_lat, q_pe):
            o_lat = decode_attention(q_lat, q_pe, kc, kpe, st.mask, cfg.softmax_scale)  # [B, H, 1, C]
        else:
            block = max(1, ATTN_SCORE_ELEMS // (B * H * st.kv_len))
            parts = [self._attend(q_lat[:, :, t:t + block], q_pe[:, :, t:t + block], kc, kpe,
                                  st.mask[:, :, t:t + block]) for t in range(0, T, block)]
            o_lat = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)              # [B, H, T, C]
        o = torch.einsum("bhtc,hvc->bthv", o_lat, self.w_uv).reshape(B, T, -1)          # [B, T, H*Dv]
        return self.o_proj(o)

    def _attend(self, q_lat, q_pe, kc, kpe, mask) -> torch.Tensor:
        """One block of queries [B, H, t, C|R] against the latent cache kc [B, S, C], kpe [B, S, R] -> [B, H, t, C].

        Every head reads the same latent keys, so heads fold into the rows of one batched GEMM per sequence
        (a broadcast over heads would materialise the cache once per head)."""
        B, H, t, C = q_lat.shape
        S = kc.shape[1]
        ql = q_lat.reshape(B, H * t, C)                                                   # [B, H*t, C]
        qp = q_pe.reshape(B, H * t, -1)                                                   # [B, H*t, R]
        scores = torch.baddbmm(ql @ kc.transpose(1, 2), qp, kpe.transpose(1, 2))         # [B, H*t, S]
        probs = torch.softmax(scores.view(B, H, t, S).float() * self.cfg.softmax_scale + mask, dim=-1)
        return (probs.to(kc.dtype).view(B, H * t, S) @ kc).view(B, H, t, C)


class MoE:
    """Softmax router with greedy top-k, routed experts through the backend, plus the shared experts."""

    def __init__(self, cfg: ModelConfig, w: Weights, i: int):
        p = f"model.layers.{i}.mlp"
        self.cfg, self.i = cfg, i
        self.gate = w(f"{p}.gate.weight").float()                                       # [E, Hd]
        self.shared = quantized_ffn(w, i, "shared") or MLP(w, f"{p}.shared_experts")

    def route(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h [T, Hd] -> (idx [T, K] int64, weights [T, K] float32), as DeepSeek-V2's own code routes: with
        norm_topk_prob the top-k weights are normalised to sum 1 and *not* scaled; otherwise they are scaled by
        routed_scaling_factor (DeepSeek-V3 normalises and then scales; transformers ignores norm_topk_prob)."""
        cfg = self.cfg
        if cfg.topk_method != "group_limited_greedy":
            return fused_moe.route_topk(h, self.gate, cfg.num_experts_per_tok,
                                        cfg.norm_topk_prob and cfg.num_experts_per_tok > 1, cfg.routed_scaling_factor)
        scores = F.linear(h.float(), self.gate).softmax(dim=-1)                           # [T, E]
        grouped = scores.view(-1, cfg.n_group, cfg.n_routed_experts // cfg.n_group)
        keep = grouped.max(-1).values.topk(cfg.topk_group, dim=-1).indices             # [T, G']
        gmask = torch.zeros_like(grouped[..., 0]).scatter_(1, keep, 1.0).bool()
        scores = (grouped * gmask.unsqueeze(-1)).view_as(scores)
        w, idx = scores.topk(cfg.num_experts_per_tok, dim=-1, sorted=False)
        if cfg.norm_topk_prob and cfg.num_experts_per_tok > 1:
            return idx, w / (w.sum(-1, keepdim=True) + 1e-20)
        return idx, w * cfg.routed_scaling_factor


@dataclass
class MoECall:
    """What the model asks of the expert backend at one MoE layer (yielded by `DeepseekV2.steps`)."""
    layer: int
    x: torch.Tensor              # [T, Hd] MoE input of the real tokens
    idx: torch.Tensor            # [T, K] routed experts
    w: torch.Tensor              # [T, K] float32 routing weights
    pred: torch.Tensor | None    # [T, K] the next MoE layer's router applied to x (prefetch hint), or None
    static: bool = False         # x, idx, w, pred are graph buffers that every replay refills in place


class DeepseekV2:
    """The whole network; weights come from `w(name)` in the compute dtype, on the compute device but for the
    token-embedding table (host memory: embedding.py)."""

    def __init__(self, cfg: ModelConfig, w: Weights, experts: ExpertBackend, device):
        self.cfg, self.experts = cfg, experts
        self.predict_next = experts.wants_guess   # also apply the next MoE layer's router early (for prefetch)
        self.embed = TokenEmbedding(w(EMBED), device)
        self.rope = Rope(cfg, device)
        self.layers = []
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}"
            mlp = MoE(cfg, w, i) if cfg.is_moe_layer(i) else quantized_ffn(w, i, "dense") or MLP(w, f"{p}.mlp")
            self.layers.append((RMSNorm(w(f"{p}.input_layernorm.weight"), cfg.rms_norm_eps), MLAttention(cfg, w, i),
                                RMSNorm(w(f"{p}.post_attention_layernorm.weight"), cfg.rms_norm_eps), mlp))
        self.norm = RMSNorm(w("model.norm.weight"), cfg.rms_norm_eps)
        self.lm_head = linear(w, "lm_head.weight")
        moe = [m for *_, m in self.layers if isinstance(m, MoE)]
        # layer L -> scores [T, E] for layer L+1's experts from L's MoE input: the next router, or a trained predictor
        self.next_scores: dict[int, Callable] = {a.i: partial(F.linear, weight=b.gate) for a, b in zip(moe, moe[1:])}

    def steps(self, x: torch.Tensor, cache: LatentCache, st: StepState, last_only: bool = True):
        """The forward pass from the embedded tokens x [B, T, Hd], as a generator: yields a MoECall at each MoE
        layer and expects the routed output [T, Hd] back (`send`); finally yields logits [B, V] of the last
        position (or [B, T, V]), float32.

        Everything between two yields is free of host synchronisation, so it can be captured as a CUDA graph."""
        rot = self.rope.rotation(st.positions)                                            # [B, T, R/2]
        h = self.layers[0][0](x)
        norms = [n for n, *_ in self.layers[1:]] + [self.norm]    # each layer's output goes to the next one's norm
        for (_, attn, post_norm, mlp), out_norm in zip(self.layers, norms):
            x, h = post_norm.add(x, attn(h, cache, st, rot))
            if not isinstance(mlp, MoE):
                x, h = out_norm.add(x, mlp(h))
                continue
            B, T, Hd = h.shape
            hf = h.reshape(-1, Hd)
            hr = hf if st.rows is None else hf.index_select(0, st.rows)
            idx, w = mlp.route(hr)
            pred = None
            if self.predict_next and mlp.i in self.next_scores:
                pred = self.next_scores[mlp.i](hr.float()).topk(self.cfg.num_experts_per_tok, dim=-1).indices
            shared = mlp.shared(hf)
            routed = yield MoECall(mlp.i, hr, idx, w, pred)
            if st.rows is not None:
                routed = torch.zeros_like(hf).index_copy_(0, st.rows, routed)
            x, h = out_norm.add(x, routed.view(B, T, Hd), shared.view(B, T, Hd))
        yield self.lm_head(h[:, -1] if last_only else h).float()

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, cache: LatentCache, st: StepState, last_only: bool = True,
                answer: Callable[[MoECall], torch.Tensor] | None = None) -> torch.Tensor:
        """ids [B, T] -> logits; every MoE call is answered by `answer` (default: the expert backend)."""
        return self.run(self.embed(ids), cache, st, last_only, answer)

    @torch.no_grad()
    def run(self, x: torch.Tensor, cache: LatentCache, st: StepState, last_only: bool = True,
            answer: Callable[[MoECall], torch.Tensor] | None = None) -> torch.Tensor:
        """`forward` from the embedded tokens x [B, T, Hd] (a graph's static input)."""
        answer = answer or self.experts.forward
        gen = self.steps(x, cache, st, last_only)
        item = next(gen)
        while isinstance(item, MoECall):
            item = gen.send(answer(item))
        return item
