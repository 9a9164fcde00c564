"""The Llama-family decoder (Llama 2/3, Qwen2, Mistral, SmolLM) over a ragged batch of token chunks."""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from ember.config import ModelConfig
from ember.errors import ModelLoadError
from ember.ops.attention import AttentionBackend, StepPlan
from ember.ops.kernels import cpu_kernels
from ember.ops.norm import RMSNorm
from ember.ops.paged_float import dense_backend
from ember.ops.quant import KERNEL_MAX_ROWS, QuantLinear
from ember.ops.rope import RotaryEmbedding, apply_rotary, inv_frequencies


class Linear(nn.Module):
    """y = x W^T (+ b), created uninitialised: every parameter is loaded from the checkpoint."""

    def __init__(self, n_in: int, n_out: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_out, n_in), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(n_out), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = self.n_heads * self.hd, self.n_kv * self.hd
        # q, k and v projections fused into one matmul; loaded by slicing (see load_weights).
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, cfg.attention_bias)
        self.o_proj = Linear(self.q_size, cfg.hidden_size)
        self.scale = self.hd ** -0.5

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], backend: AttentionBackend,
                plan: StepPlan) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = apply_rotary(q.view(t, self.n_heads, self.hd), k.view(t, self.n_kv, self.hd), *rope)
        o = backend.forward(self.layer, q, k, v.view(t, self.n_kv, self.hd), plan, self.scale)
        return self.o_proj(o.reshape(t, self.q_size))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.inter = cfg.intermediate_size
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gu = self.gate_up_proj(x)
        kern = cpu_kernels() if gu.dtype == torch.float32 else None
        if kern is not None:
            return self.down_proj(kern.silu_mul(gu))
        gate, up = gu.split(self.inter, dim=-1)
        return self.down_proj(nn.functional.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], backend: AttentionBackend,
                plan: StepPlan, attn: bool = True, mlp: bool = True) -> torch.Tensor:
        """attn / mlp False: that sub-layer is left out (its residual passes through; no KV is written)."""
        if attn:
            x = x + self.self_attn(self.input_layernorm(x), rope, backend, plan)
        return x + self.mlp(self.post_attention_layernorm(x)) if mlp else x


def _projections(layer: DecoderLayer) -> tuple[nn.Module, ...]:
    # Read through _modules: nn.Module.__getattr__ made this key 2.6% of a single-stream step.
    attn, mlp = layer._modules["self_attn"]._modules, layer._modules["mlp"]._modules
    return attn["qkv_proj"], attn["o_proj"], mlp["gate_up_proj"], mlp["down_proj"]


def _fused_linear(kern: Any, m: nn.Module) -> Any:
    none = torch.empty(0)
    bias = none if m.bias is None else m.bias.data
    if isinstance(m, QuantLinear):
        return kern.DecodeLinear(m.bits, m.qweight, m.scales, none if m.mins is None else m.mins, bias)
    if isinstance(m, Linear):
        return kern.DecodeLinear(32, m.weight.data, none, none, bias)
    raise TypeError(f"no fused decode path for {type(m).__name__}")


def _build_fused(kern: Any, model: "LlamaModel") -> Any | None:
    """A C++ DecodeModel holding references to this model's weights (None if a layer type is unknown)."""
    cfg = model.config
    fused = kern.DecodeModel(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps, model.norm.weight.data)
    try:
        for layer in model.layers:
            fused.add_layer(layer.input_layernorm.weight.data, layer.post_attention_layernorm.weight.data,
                            *(_fused_linear(kern, m) for m in _projections(layer)))
    except TypeError:
        return None
    return fused


class LlamaModel(nn.Module):
    """Embedding, decoder layers, final norm and LM head; the KV cache is passed in, not owned."""

    def __init__(self, cfg: ModelConfig, max_positions: int | None = None) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                         _weight=torch.empty(cfg.vocab_size, cfg.hidden_size), _freeze=True)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size)
        self.max_positions = max_positions or cfg.max_position_embeddings
        self.set_rope()
        self._fused: tuple[tuple[nn.Module, ...], Any, bool] | None = None

    def set_rope(self, freq_factors: torch.Tensor | None = None) -> None:
        inv = inv_frequencies(self.config.head_dim, self.config.rope_theta, self.config.rope_scaling,
                              freq_factors)
        self.rope = RotaryEmbedding(inv, self.max_positions)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, backend: AttentionBackend,
                plan: StepPlan, depth: int | None = None) -> torch.Tensor:
        """input_ids, positions: [T]; the step's KV layout and its plan. Returns final hidden states [T, hidden];
        with `depth`, only the first `depth` layers run (their KV is written) and the hidden states returned
        are those layers' output, not normalised: for steps that only read attention."""
        x = self.embed_tokens(input_ids)
        rope = self.rope(positions, x.dtype)
        if depth is not None and depth < len(self.layers):
            for layer in self.layers[:depth]:
                x = layer(x, rope, backend, plan)
            return x
        fused = self._fused_decoder(x)
        if fused is not None:  # all layers in one C++ call, where the backend's plan allows it
            hidden = backend.fused_forward(fused, x, *rope, plan, self.layers[0].self_attn.scale)
            if hidden is not None:
                return hidden
        skip = plan.skip or frozenset()
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, backend, plan, 2 * i not in skip, 2 * i + 1 not in skip)
        return self.norm(x)

    def _fused_decoder(self, x: torch.Tensor) -> Any:
        """The C++ decoder stack when the activations are float32 and every projection is a plain or
        quantized linear the kernels run (for at most KERNEL_MAX_ROWS rows if quantized); else None."""
        if x.dtype != torch.float32 or not self.layers:
            return None
        kern = cpu_kernels()
        if kern is None:
            return None
        # Rebuilt when a projection module was swapped (quantization, compression) since the last step;
        # the key holds the modules themselves (compared by identity), so none can be freed and reused.
        key = tuple(m for layer in self.layers for m in _projections(layer))
        if self._fused is None or self._fused[0] != key:
            quant = any(isinstance(m, QuantLinear) for layer in self.layers for m in _projections(layer))
            self._fused = (key, _build_fused(kern, self), quant)
        _, fused, quant = self._fused
        # Beyond KERNEL_MAX_ROWS the module path dequantizes quantized layers for a float GEMM.
        return None if quant and x.shape[0] > KERNEL_MAX_ROWS else fused

    def dense_context(self, n: int) -> tuple[AttentionBackend, StepPlan]:
        """Scratch KV caches and the plan for one causal sequence of n tokens: the plain, unpaged forward
        used by perplexity and calibration."""
        cfg = self.config
        return dense_backend(cfg.num_layers, n, cfg.num_kv_heads, cfg.head_dim, self.embed_tokens.weight.dtype)

    @torch.inference_mode()
    def forward_dense(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Final hidden states [T, hidden] of one sequence input_ids [T], starting at position 0."""
        backend, plan = self.dense_context(input_ids.shape[0])
        return self(input_ids, torch.arange(input_ids.shape[0]), backend, plan)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:  # tied: the embedding table is the head
            return torch.nn.functional.linear(hidden, self.embed_tokens.weight).float()
        return self.lm_head(hidden).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], source: str) -> None:
        """Copy Hugging Face-named tensors in, fusing q/k/v and gate/up; every parameter must be set."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, w in weights:
            name = name.removeprefix("model.")
            if name in loaded:
                raise ModelLoadError(f"{source}: tensor {name} appears twice")
            if name == "rope_freqs.weight":
                self._load_rope_freqs(w, source)
                loaded.add(name)
                continue
            target, rows = self._fused_target(name)
            if target not in params:
                if "rotary_emb" in name or (name == "lm_head.weight" and self.lm_head is None):
                    continue
                raise ModelLoadError(f"{source}: unexpected tensor {name!r} for a {self.config.arch} model")
            p = params[target]
            dst = p.data if rows is None else p.data[rows]
            if dst.shape != w.shape:
                raise ModelLoadError(f"{source}: tensor {name} has shape {tuple(w.shape)}, "
                                     f"expected {tuple(dst.shape)}")
            dst.copy_(w)
            loaded.add(name)
        self._check_complete(loaded, source)

    def _load_rope_freqs(self, w: torch.Tensor, source: str) -> None:
        """llama.cpp's per-pair rope frequency divisors: [head_dim / 2], finite and positive."""
        want = (self.config.head_dim // 2,)
        if tuple(w.shape) != want:
            raise ModelLoadError(f"{source}: tensor rope_freqs.weight has shape {tuple(w.shape)}, expected {want}")
        if not w.is_meta and not bool((torch.isfinite(w) & (w > 0)).all()):
            raise ModelLoadError(f"{source}: tensor rope_freqs.weight holds values that are not finite and positive; "
                                 "the file is corrupt: re-download or re-convert it")
        self.set_rope(w)

    def _fused_target(self, name: str) -> tuple[str, slice | None]:
        attn = self.layers[0].self_attn if len(self.layers) else None
        for i, part in enumerate(("q_proj", "k_proj", "v_proj")):
            if f".self_attn.{part}." in name and attn is not None:
                starts = (0, attn.q_size, attn.q_size + attn.kv_size)
                size = attn.q_size if i == 0 else attn.kv_size
                return name.replace(part, "qkv_proj"), slice(starts[i], starts[i] + size)
        inter = self.config.intermediate_size
        if ".mlp.gate_proj." in name:
            return name.replace("gate_proj", "gate_up_proj"), slice(0, inter)
        if ".mlp.up_proj." in name:
            return name.replace("up_proj", "gate_up_proj"), slice(inter, 2 * inter)
        return name, None

    def _check_complete(self, loaded: set[str], source: str) -> None:
        expected: set[str] = set()
        for name, _ in self.named_parameters():
            if ".qkv_proj." in name:
                expected |= {name.replace("qkv_proj", p) for p in ("q_proj", "k_proj", "v_proj")}
            elif ".gate_up_proj." in name:
                expected |= {name.replace("gate_up_proj", p) for p in ("gate_proj", "up_proj")}
            else:
                expected.add(name)
        missing = sorted(expected - loaded)
        if missing:
            raise ModelLoadError(f"{source}: missing tensors {missing[:5]}"
                                 f"{' and more' if len(missing) > 5 else ''}")
